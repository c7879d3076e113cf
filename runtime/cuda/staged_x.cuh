// The order in which the wgmma GEMM (w4a16_wgmma.cu) reads its activations x[M, K] ("staged"),
// for the kernels that write them: w4_stage_x reorders row-major x into it, and the kernels whose
// rows feed an int4 linear on that path (add_rmsnorm, silu_mul, attention_prefill) write it
// themselves, so that the GEMM's input costs no kernel of its own (H100, M = 128: 4096 x 4096
// 13.8 us on staged x, 16.0 with w4_stage_x ahead of it; 7B-shape int4 pp512 +1.6%;
// docs/performance.md).
//
// In 16-byte units of 8 halves: unit u = 16 grp + 2 t + hi of row r (grp: the group of 128
// channels; t: the virtual k-tile 0..7 of the group; hi: its k 0..7 or 8..15) lies at unit
//   (grp * M8 / 8 + r / 8) * 128 + (2 t + hi) * 8 + r % 8      (M8: the rows rounded up to 8)
// and holds the channels 128 grp + 32 c + 4 t + 2 hi + e in its places 2 c + e (c = 0..3, e = 0, 1):
// wgmma's core matrices (8 rows x 8 k) in the k order of the packed weights (w4a16_common.cuh).
// Rows M .. M8 - 1 may hold anything: they only reach outputs that are never stored.
#pragma once
#include <cstddef>

namespace tmkit::cuda {

__host__ __device__ __forceinline__ size_t staged_rows(int M) { return size_t(M + 7) / 8 * 8; }

// The channel in place p (0..7) of unit u.
__host__ __device__ __forceinline__ int staged_channel(int u, int p) {
  return u / 16 * 128 + 32 * (p / 2) + 4 * (u % 16 / 2) + 2 * (u % 2) + p % 2;
}

// Where unit u of row r lies, in units of 16 bytes from the start of the staged buffer.
__host__ __device__ __forceinline__ size_t staged_unit(int r, int u, int M8) {
  return (size_t(u / 16) * (M8 / 8) + r / 8) * 128 + (u % 16) * 8 + r % 8;
}

// Where channel ch of row r lies, in halves from the start (channels 2j and 2j + 1 stay adjacent).
__host__ __device__ __forceinline__ size_t staged_element(int r, int ch, int M8) {
  const int kk = ch % 128, u = ch / 128 * 16 + kk % 32 / 4 * 2 + kk % 4 / 2;
  return staged_unit(r, u, M8) * 8 + kk / 32 * 2 + kk % 2;
}

}  // namespace tmkit::cuda
