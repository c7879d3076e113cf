// An int4 linear (TurboMind v0.6 layout, group 128) on the device, repacked at load time into the
// layout of the W4A16 kernels (cuda/w4a16_common.cuh), and its product with fp16 activations. The
// files on disk keep the spec's layout; only device memory holds the packed one.
#pragma once
#include "cuda/cuda_utils.h"
#include "cuda/kernels.h"
#include "int4.h"

namespace tmkit {

class W4Linear {
 public:
  explicit W4Linear(const Int4Linear& w);
  int K = 0, N = 0;

  // Which kernel computes a product: for few rows the streaming kernel (N % 16 == 0) or else the
  // split-K GEMV; for more the wgmma GEMM (N % 128 == 0) or else the mma.sync GEMM; for many, W
  // dequantized to fp16 + cuBLAS (the only one for zero points that are not integers 0..15).
  enum class Path { kAuto, kGemv, kGemm, kDense, kWgmma };
  // Row counts where kAuto switches, from bench-kernels on an H200 (docs/performance.md): the
  // tensor-core GEMMs win from 17 rows; at 2048 dequantize + cuBLAS is as fast as wgmma, at 512
  // the mma.sync GEMM is 1.6-1.8x slower than dequantize + cuBLAS.
  static constexpr int kGemvRows = 16, kGemmRows = 128, kWgmmaRows = 1024;

  // y[M, N] (fp32) = x[M, K] (fp16) * W; `scratch` holds the dequantized W on the kDense path and
  // x staged on the kWgmma one (grown as needed). kGemv takes M <= 32. Only the streaming kernel
  // does more than write y (cuda::GemvOut): callers ask streams() first. `x_staged`: x is already
  // in the wgmma GEMM's order (cuda/staged_x.cuh), as the kernel ahead wrote it for a linear that
  // takes_staged(M). Returns the streaming kernel's blocks (GemvOut::residual's partials), else 0.
  int run(cublasHandle_t blas, const __half* x, int M, const cuda::GemvOut<__half>& out,
           cuda::DeviceBuffer<__half>& scratch, cudaStream_t st, Path path = Path::kAuto, bool x_staged = false) const;
  bool streams(int M, Path path = Path::kAuto) const { return choose(M, path) == Path::kGemv && M <= 16 && N % 16 == 0; }
  bool takes_staged(int M) const { return choose(M, Path::kAuto) == Path::kWgmma; }
  // The `scratch` elements run(M) needs: callers capturing CUDA graphs grow it first.
  size_t scratch_elements(int M) const { return scratch_for(choose(M, Path::kAuto), M); }

 private:
  cuda::DeviceBuffer<uint32_t> packed_;  // see cuda/w4a16_common.cuh
  cuda::DeviceBuffer<__half> scales_, zeros_;  // [K/128, N], as on disk
  cuda::DeviceBuffer<uint32_t> scale_zero_;     // w4a16_stream's order (N % 16 == 0)
  bool fused_ = true;  // integer zero points: the tensor-core kernels apply
  size_t scratch_for(Path p, int M) const;
  Path choose(int M, Path path) const {
    if (!fused_) return Path::kDense;
    if (path == Path::kWgmma && N % 128 != 0) return Path::kGemm;
    if (path != Path::kAuto) return path;
    if (M <= kGemvRows) return Path::kGemv;
    if (N % 128 == 0) return M <= kWgmmaRows ? Path::kWgmma : Path::kDense;
    return M <= kGemmRows ? Path::kGemm : Path::kDense;
  }
};

}  // namespace tmkit
