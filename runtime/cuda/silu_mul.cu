// Gated MLP activation: out[t, c] = silu(gate) * up, reading the fused gate/up GEMM output (row
// width 2I) and writing T for the down projection. Flat over the outputs: at decode (one row) a
// block per row left each thread a chain of dependent loads (20 us for I = 11008; ncu). Decode
// steps mostly skip this kernel: the GEMV writes the activation itself (GemvOut::act).
// With I % 8 == 0 a thread takes 8 consecutive outputs of a row, whose gates and ups are two runs
// of 8 floats in either column order: 16-byte loads and stores (prefill at T = 512, I = 11008:
// one thread per output with 64-bit index divisions took 29 us, ~1.9 TB/s).
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
__global__ void silu_mul8_kernel(const float* __restrict__ gu, int T_, int I, bool interleaved, T* __restrict__ out) {
  pdl_begin();
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x, per_row = size_t(I / 8);
  if (i >= size_t(T_) * per_row) return;
  const size_t t = i / per_row;
  const int c = int(i % per_row) * 8;
  const float* row = gu + t * 2 * I;
  const float4* gate = reinterpret_cast<const float4*>(row + (interleaved ? 2 * c : c));
  const float4* up = reinterpret_cast<const float4*>(row + (interleaved ? 2 * c + 8 : I + c));
  __align__(16) float g[8], u[8];
  *reinterpret_cast<float4*>(g) = gate[0], *reinterpret_cast<float4*>(g + 4) = gate[1];
  *reinterpret_cast<float4*>(u) = up[0], *reinterpret_cast<float4*>(u + 4) = up[1];
  __align__(16) T o[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) o[k] = from_float<T>(silu(g[k]) * u[k]);
  reinterpret_cast<uint4*>(out + t * I)[c / 8] = *reinterpret_cast<const uint4*>(o);
}

template <typename T>
void silu_mul(const float* gu, int T_, int I, bool interleaved, T* out, cudaStream_t s) {
  const size_t n = size_t(T_) * I;
  if (I % 8 == 0) return launch_kernel(silu_mul8_kernel<T>, unsigned((n / 8 + 127) / 128), 128, 0, s, gu, T_, I, interleaved, out);
  launch_kernel(silu_mul_kernel<T>, unsigned((n + 255) / 256), 256, 0, s, gu, T_, I, interleaved, out);
}

template void silu_mul<__half>(const float*, int, int, bool, __half*, cudaStream_t);
template void silu_mul<__nv_bfloat16>(const float*, int, int, bool, __nv_bfloat16*, cudaStream_t);

}  // namespace tmkit::cuda
