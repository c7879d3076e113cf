// Gated MLP activation: out[t, c] = silu(gate) * up, reading the fused gate/up GEMM output (row
// width 2I) and writing T for the down projection. One thread per output: at decode (one row) a
// block per row left each thread a chain of dependent loads (20 us for I = 11008; ncu). Decode
// steps mostly skip this kernel: the GEMV writes the activation itself (GemvOut::act).
#include "gemv_out.cuh"
#include "kernels.h"

namespace tmkit::cuda {

template <typename T>
__global__ void silu_mul_kernel(const float* __restrict__ gu, int T_, int I, bool interleaved, T* __restrict__ out) {
  pdl_begin();
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= size_t(T_) * I) return;
  const size_t t = i / size_t(I), c = i % size_t(I);
  const size_t gate = interleaved ? gate_column(c) : c, up = interleaved ? gate + 8 : I + c;
  out[i] = from_float<T>(silu(gu[t * 2 * I + gate]) * gu[t * 2 * I + up]);
}

template <typename T>
void silu_mul(const float* gu, int T_, int I, bool interleaved, T* out, cudaStream_t s) {
  const size_t n = size_t(T_) * I;
  launch_kernel(silu_mul_kernel<T>, unsigned((n + 255) / 256), 256, 0, s, gu, T_, I, interleaved, out);
}

template void silu_mul<__half>(const float*, int, int, bool, __half*, cudaStream_t);
template void silu_mul<__nv_bfloat16>(const float*, int, int, bool, __nv_bfloat16*, cudaStream_t);

}  // namespace tmkit::cuda
