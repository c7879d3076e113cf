// Gated MLP activation: out[t, c] = silu(gate) * up, reading the fused [gate | up] GEMM output
// (row width 2I) and writing T for the down projection.
#include "kernels.h"

namespace tmkit::cuda {

template <typename T>
__global__ void silu_mul_kernel(const float* gu, int I, T* out) {
  const float* row = gu + size_t(blockIdx.x) * 2 * I;
  T* o = out + size_t(blockIdx.x) * I;
  for (int c = threadIdx.x; c < I; c += blockDim.x) {
    const float g = row[c];
    o[c] = from_float<T>(g / (1.0f + __expf(-g)) * row[I + c]);
  }
}

template <typename T>
void silu_mul(const float* gu, int T_, int I, T* out, cudaStream_t s) {
  silu_mul_kernel<<<T_, 256, 0, s>>>(gu, I, out);
  TMKIT_CUDA_LAUNCHED();
}

template void silu_mul<__half>(const float*, int, int, __half*, cudaStream_t);
template void silu_mul<__nv_bfloat16>(const float*, int, int, __nv_bfloat16*, cudaStream_t);

}  // namespace tmkit::cuda
