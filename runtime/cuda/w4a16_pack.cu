// The packed int4 layout's conversions (layout: w4a16_common.cuh): TurboMind's v0.6 qweight into it
// at load time (and the scales and zeros into w4a16_stream.cu's order), and back out to dense fp16
// for the dequantize + cuBLAS path.
#include "kernels.h"
#include "w4a16_common.cuh"

namespace tmkit::cuda {

namespace {

using w4::kGroup;

// packed word o (see w4a16_common.cuh) from qweight [K, N/8] (v0.6: column 8w + j at bits 4j).
__global__ void w4_pack_kernel(const uint32_t* __restrict__ qweight, int K, int N, uint32_t* __restrict__ packed) {
  const size_t o = size_t(blockIdx.x) * blockDim.x + threadIdx.x, groups = size_t(K) / kGroup;
  if (o >= size_t(K) * N / 8) return;
  const int j = int(o % 4), lane = int((o / 4) % 32);
  const size_t unit = o / 128, grp = unit % groups, tile = unit / groups;
  const int col = lane / 4, c = lane % 4;
  constexpr int kNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  uint32_t word = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const size_t k = grp * kGroup + 32 * c + 8 * j + e;
    word |= ((qweight[k * (N / 8) + tile] >> (4 * col)) & 0xfu) << (4 * kNibble[e]);
  }
  packed[o] = word;
}

// w[k, n] = fp16((q - z) * s) for 8 rows k = 8 kk .. 8 kk + 7 of column n per thread (n fastest:
// the stores coalesce).
__global__ void w4_dequant_packed_kernel(const uint32_t* __restrict__ packed, const __half* __restrict__ scales,
                                         const __half* __restrict__ zeros, int K, int N, __half* __restrict__ w) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x, groups = size_t(K) / kGroup;
  if (i >= size_t(K) / 8 * N) return;
  const size_t n = i % size_t(N), kk = i / size_t(N), grp = kk / 16;
  const int c = int(kk % 16) / 4, j = int(kk % 4);
  const uint32_t word = packed[(((n / 8) * groups + grp) * 32 + 4 * (n % 8) + c) * 4 + j];
  const float s = __half2float(scales[grp * N + n]), z = __half2float(zeros[grp * N + n]);
  constexpr int kNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};
#pragma unroll
  for (int e = 0; e < 8; ++e)
    w[(kk * 8 + e) * N + n] = __float2half_rn((float((word >> (4 * kNibble[e])) & 0xfu) - z) * s);
}

// scale_zero[(u * groups + grp) * 8 + g] = {half2(s, z) of column 16u + g, of column 16u + 8 + g}
// (the layout of w4a16_stream.cu), one entry per thread.
__global__ void w4_pack_scale_zero_kernel(const __half* __restrict__ scales, const __half* __restrict__ zeros, int K,
                                          int N, uint2* __restrict__ scale_zero) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x, groups = size_t(K) / kGroup;
  if (i >= groups * N / 2) return;
  const size_t g = i % 8, grp = (i / 8) % groups, u = i / 8 / groups;
  const size_t a = grp * N + 16 * u + g, b = a + 8;
  const __half2 sa = __halves2half2(scales[a], zeros[a]), sb = __halves2half2(scales[b], zeros[b]);
  scale_zero[i] = make_uint2(*reinterpret_cast<const uint32_t*>(&sa), *reinterpret_cast<const uint32_t*>(&sb));
}

}  // namespace

void w4_pack(const uint32_t* qweight, int K, int N, uint32_t* packed, cudaStream_t s) {
  if (K % kGroup || N % 8) fail("w4_pack: K = {} must be a multiple of {} and N = {} of 8", K, kGroup, N);
  const size_t words = size_t(K) * N / 8;
  w4_pack_kernel<<<unsigned((words + 255) / 256), 256, 0, s>>>(qweight, K, N, packed);
  TMKIT_CUDA_LAUNCHED();
}

void w4_dequant_packed(const uint32_t* packed, const __half* scales, const __half* zeros, int K, int N, __half* w,
                       cudaStream_t s) {
  const size_t threads = size_t(K) / 8 * N;
  w4_dequant_packed_kernel<<<unsigned((threads + 255) / 256), 256, 0, s>>>(packed, scales, zeros, K, N, w);
  TMKIT_CUDA_LAUNCHED();
}

void w4_pack_scale_zero(const __half* scales, const __half* zeros, int K, int N, uint32_t* scale_zero, cudaStream_t s) {
  if (K % kGroup || N % 16) fail("w4_pack_scale_zero: K = {} must be a multiple of {} and N = {} of 16", K, kGroup, N);
  const size_t entries = size_t(K) / kGroup * N / 2;
  w4_pack_scale_zero_kernel<<<unsigned((entries + 255) / 256), 256, 0, s>>>(scales, zeros, K, N,
                                                                             reinterpret_cast<uint2*>(scale_zero));
  TMKIT_CUDA_LAUNCHED();
}

}  // namespace tmkit::cuda
