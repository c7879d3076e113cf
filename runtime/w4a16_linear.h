// An int4 linear (TurboMind v0.6 layout, group 128) on the device, repacked at load time into the
// layout of the W4A16 kernel (cuda/w4a16_mma.cu), and its product with fp16 activations. The
// files on disk keep the spec's layout; only device memory holds the packed one.
#pragma once
#include "cuda/cuda_utils.h"
#include "int4.h"

namespace tmkit {

class W4Linear {
 public:
  explicit W4Linear(const Int4Linear& w);
  int K = 0, N = 0;

  // y[M, N] (fp32) = x[M, K] (fp16) * W. Up to kFusedRows rows run the fused W4A16 kernel; longer
  // inputs dequantize W into `dense` (grown as needed) and use cuBLAS. `fused` = false forces that.
  // (bench-kernels: the fused kernel wins up to M = 32; from M ~ 48 dequantize + cuBLAS is faster.)
  static constexpr int kFusedRows = 32;
  void run(cublasHandle_t blas, const __half* x, int M, float* y, cuda::DeviceBuffer<__half>& dense,
           cudaStream_t st) const;
  // The `dense` elements run(M) needs (0 on the fused path): callers capturing CUDA graphs grow it first.
  size_t dense_elements(int M) const { return fused_ && M <= kFusedRows ? 0 : size_t(K) * size_t(N); }

 private:
  cuda::DeviceBuffer<uint32_t> packed_;  // see cuda/w4a16_mma.cu
  cuda::DeviceBuffer<__half> scales_, zeros_;  // [K/128, N], as on disk
  bool fused_ = true;  // integer zero points: the fused kernel applies
};

}  // namespace tmkit
