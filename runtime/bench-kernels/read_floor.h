// A read-only kernel over n_bytes (a multiple of 16): the least time a W4A16 product that streams
// as many bytes can take (read_floor.cu). `sink` holds at least 4 * SMs words.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

void read_floor(const void* bytes, size_t n_bytes, uint32_t* sink, cudaStream_t s);
