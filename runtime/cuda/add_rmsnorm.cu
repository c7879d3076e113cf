// Residual add fused with RMSNorm. One block per row:
//   x[t, :] += delta[t, :] (+ bias)        fp32 residual stream, updated in place
//   y[t, :]  = x / sqrt(mean(x^2) + eps) * w   in T, the next GEMM's input
// A thread owns kPer channels c = threadIdx.x + i * 1024, held in registers from one batch of
// independent loads: with a strided loop over the row (store, then load, in turn) each thread's
// loads ran one after another, 10-14 us per decode row for hidden 4096 (ncu), now one round trip.
// `staged`: y in the wgmma GEMM's order (staged_x.cuh) for the int4 linear that reads it; a
// thread's values are then whole units of 8 channels (value i: unit threadIdx.x + i / 8 * 1024),
// stored as one 16-byte word each.
#include "block_reduce.cuh"
#include "kernels.h"
#include "staged_x.cuh"

namespace tmkit::cuda {

namespace {

constexpr int kThreads = 1024, kMaxPer = 16;  // hidden <= 16384

// The channel of this thread's value i.
template <bool kStaged>
__device__ __forceinline__ int channel_of(int i) {
  if constexpr (kStaged) return staged_channel(threadIdx.x + i / 8 * kThreads, i % 8);
  return threadIdx.x + i * kThreads;
}

template <typename T, int kPer, bool kStaged>
__global__ void __launch_bounds__(kThreads) add_rmsnorm_kernel(float* __restrict__ x, const float* __restrict__ delta,
                                                              const T* __restrict__ bias, const T* __restrict__ w,
                                                              float eps, int hidden, int M8, T* __restrict__ y) {
  static_assert(!kStaged || kPer % 8 == 0, "staged values come in units of 8");
  __shared__ float scratch[32];
  // The weights and the bias are constants: loaded before the wait for the kernel ahead
  // (programmatic launch, cuda_utils.h), they cost a decode step no round trip of their own.
  float wv[kPer], bv[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = channel_of<kStaged>(i);
    wv[i] = c < hidden ? to_float(w[c]) : 0.0f;
    bv[i] = c < hidden && delta && bias ? to_float(bias[c]) : 0.0f;
  }
  pdl_begin();
  float* row = x + size_t(blockIdx.x) * hidden;
  const float* d = delta ? delta + size_t(blockIdx.x) * hidden : nullptr;
  float v[kPer];
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = channel_of<kStaged>(i);
    v[i] = c < hidden ? row[c] : 0.0f;
    if (d && c < hidden) v[i] += d[c] + bv[i];
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = channel_of<kStaged>(i);
    if (d && c < hidden) row[c] = v[i];
    ss += v[i] * v[i];
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / float(hidden) + eps);
  if constexpr (kStaged) {
#pragma unroll
    for (int j = 0; j < kPer / 8; ++j) {
      const int u = threadIdx.x + j * kThreads;
      if (u * 8 >= hidden) continue;
      __align__(16) T o[8];
#pragma unroll
      for (int p = 0; p < 8; ++p) o[p] = from_float<T>(v[8 * j + p] * inv * wv[8 * j + p]);
      reinterpret_cast<uint4*>(y)[staged_unit(blockIdx.x, u, M8)] = *reinterpret_cast<const uint4*>(o);
    }
    return;
  }
  T* out = y + size_t(blockIdx.x) * hidden;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = channel_of<kStaged>(i);
    if (c < hidden) out[c] = from_float<T>(v[i] * inv * wv[i]);
  }
}

template <typename T, int kPer, bool kStaged>
void launch(float* x, const float* delta, const T* bias, const T* w, float eps, int T_, int hidden, T* y, cudaStream_t s) {
  if (hidden > kPer * kThreads) {
    if constexpr (kPer < kMaxPer) return launch<T, kPer * 2, kStaged>(x, delta, bias, w, eps, T_, hidden, y, s);
    fail("RMSNorm: hidden size {} > {} is not supported on the GPU", hidden, kMaxPer * kThreads);
  }
  launch_kernel(add_rmsnorm_kernel<T, kPer, kStaged>, T_, kThreads, 0, s, x, delta, bias, w, eps, hidden,
                int(staged_rows(T_)), y);
}

}  // namespace

template <typename T>
void add_rmsnorm(float* x, const float* delta, const T* bias, const T* w, float eps, int T_, int hidden, T* y,
                 cudaStream_t s, bool staged) {
  if (!staged) return launch<T, 1, false>(x, delta, bias, w, eps, T_, hidden, y, s);
  if (hidden % 128) fail("RMSNorm: hidden size {} cannot be staged for the wgmma GEMM (a multiple of 128)", hidden);
  launch<T, 8, true>(x, delta, bias, w, eps, T_, hidden, y, s);
}

template void add_rmsnorm<__half>(float*, const float*, const __half*, const __half*, float, int, int, __half*, cudaStream_t,
                                  bool);
template void add_rmsnorm<__nv_bfloat16>(float*, const float*, const __nv_bfloat16*, const __nv_bfloat16*, float, int, int,
                                         __nv_bfloat16*, cudaStream_t, bool);

}  // namespace tmkit::cuda
