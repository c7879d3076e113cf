// Residual add fused with RMSNorm. One block per row:
//   x[t, :] += delta[t, :] (+ bias)        fp32 residual stream, updated in place
//   y[t, :]  = x / sqrt(mean(x^2) + eps) * w   in T, the next GEMM's input
// The row is read once into registers-by-stride and written twice (x and y).
#include "block_reduce.cuh"
#include "kernels.h"

namespace tmkit::cuda {

template <typename T>
__global__ void add_rmsnorm_kernel(float* x, const float* delta, const T* bias, const T* w, float eps, int hidden, T* y) {
  __shared__ float scratch[32];
  float* row = x + size_t(blockIdx.x) * hidden;
  const float* d = delta ? delta + size_t(blockIdx.x) * hidden : nullptr;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    float v = row[c];
    if (d) {
      v += d[c] + (bias ? to_float(bias[c]) : 0.0f);
      row[c] = v;
    }
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / float(hidden) + eps);
  T* out = y + size_t(blockIdx.x) * hidden;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) out[c] = from_float<T>(row[c] * inv * to_float(w[c]));
}

template <typename T>
void add_rmsnorm(float* x, const float* delta, const T* bias, const T* w, float eps, int T_, int hidden, T* y,
                 cudaStream_t s) {
  add_rmsnorm_kernel<<<T_, 256, 0, s>>>(x, delta, bias, w, eps, hidden, y);
  TMKIT_CUDA_LAUNCHED();
}

template void add_rmsnorm<__half>(float*, const float*, const __half*, const __half*, float, int, int, __half*, cudaStream_t);
template void add_rmsnorm<__nv_bfloat16>(float*, const float*, const __nv_bfloat16*, const __nv_bfloat16*, float, int, int,
                                         __nv_bfloat16*, cudaStream_t);

}  // namespace tmkit::cuda
