// Gated MLP activation: out[t, c] = silu(gate) * up, reading the fused gate/up GEMM output (row
// width 2I) and writing T for the down projection. Flat over the outputs: at decode (one row) a
// block per row left each thread a chain of dependent loads (20 us for I = 11008; ncu). Decode
// steps mostly skip this kernel: the GEMV writes the activation itself (GemvOut::act).
// With I % 8 == 0 a thread takes 8 consecutive outputs of a row, whose gates and ups are two runs
// of 8 floats in either column order: 16-byte loads and stores (prefill at T = 512, I = 11008:
// one thread per output with 64-bit index divisions took 29 us, ~1.9 TB/s).
// `staged`: out in the wgmma GEMM's order (staged_x.cuh) for the int4 down projection; a thread
// then takes unit u of its row, 4 pairs of channels (float2 loads), one 16-byte store.
#include "gemv_out.cuh"
#include "kernels.h"
#include "staged_x.cuh"

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

template <typename T, bool kStaged>
__global__ void silu_mul8_kernel(const float* __restrict__ gu, int T_, int I, bool interleaved, T* __restrict__ out) {
  pdl_begin();
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x, per_row = size_t(I / 8);
  if (i >= size_t(T_) * per_row) return;
  const size_t t = i / per_row;
  const int u = int(i % per_row);
  const float* row = gu + t * 2 * I;
  __align__(16) float g[8], up[8];
  if constexpr (kStaged) {
#pragma unroll
    for (int p = 0; p < 8; p += 2) {
      const int c = staged_channel(u, p);
      const float* gate = row + (interleaved ? gate_column(size_t(c)) : size_t(c));
      *reinterpret_cast<float2*>(g + p) = *reinterpret_cast<const float2*>(gate);
      *reinterpret_cast<float2*>(up + p) = *reinterpret_cast<const float2*>(gate + (interleaved ? 8 : I));
    }
  } else {
    const float4* gate = reinterpret_cast<const float4*>(row + (interleaved ? 16 * u : 8 * u));
    const float4* upv = reinterpret_cast<const float4*>(row + (interleaved ? 16 * u + 8 : I + 8 * u));
    *reinterpret_cast<float4*>(g) = gate[0], *reinterpret_cast<float4*>(g + 4) = gate[1];
    *reinterpret_cast<float4*>(up) = upv[0], *reinterpret_cast<float4*>(up + 4) = upv[1];
  }
  __align__(16) T o[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) o[k] = from_float<T>(silu(g[k]) * up[k]);
  const size_t at = kStaged ? staged_unit(int(t), u, int(staged_rows(T_))) : t * per_row + u;
  reinterpret_cast<uint4*>(out)[at] = *reinterpret_cast<const uint4*>(o);
}

template <typename T>
void silu_mul(const float* gu, int T_, int I, bool interleaved, T* out, cudaStream_t s, bool staged) {
  const size_t n = size_t(T_) * I;
  const unsigned blocks8 = unsigned((n / 8 + 127) / 128);
  if (staged) {
    if (I % 128) fail("SiLU: intermediate size {} cannot be staged for the wgmma GEMM (a multiple of 128)", I);
    return launch_kernel(silu_mul8_kernel<T, true>, blocks8, 128, 0, s, gu, T_, I, interleaved, out);
  }
  if (I % 8 == 0) return launch_kernel(silu_mul8_kernel<T, false>, blocks8, 128, 0, s, gu, T_, I, interleaved, out);
  launch_kernel(silu_mul_kernel<T>, unsigned((n + 255) / 256), 256, 0, s, gu, T_, I, interleaved, out);
}

template void silu_mul<__half>(const float*, int, int, bool, __half*, cudaStream_t, bool);
template void silu_mul<__nv_bfloat16>(const float*, int, int, bool, __nv_bfloat16*, cudaStream_t, bool);

}  // namespace tmkit::cuda
