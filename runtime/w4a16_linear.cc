#include "w4a16_linear.h"

#include <cmath>

#include "cuda/kernels.h"
#include "gpu_model.h"

namespace tmkit {

namespace {

// The fused kernel's exact dequantization needs integer zero points 0..15 (what every AWQ or RTN
// quantizer writes); any other value takes the dequantize + cuBLAS path.
bool integral_zeros(const Int4Linear& w) {
  for (uint16_t z : w.zeros) {
    const float f = half_to_float(z);
    if (!(f >= 0.0f && f <= 15.0f) || f != std::floor(f)) return false;
  }
  return true;
}

}  // namespace

W4Linear::W4Linear(const Int4Linear& w) : K(int(w.K)), N(int(w.N)), fused_(integral_zeros(w)) {
  if (w.group != 128) fail("int4 linear [{}, {}]: group size {} is not supported on the GPU (128; --device cpu runs any)", w.K, w.N, w.group);
  if (w.K % 128 || w.N % 8) fail("int4 linear [{}, {}]: K must be a multiple of 128 and N of 8", w.K, w.N);
  cuda::DeviceBuffer<uint32_t> raw(w.qweight.size());
  packed_.resize(w.qweight.size());
  scales_.resize(w.scales.size());
  zeros_.resize(w.zeros.size());
  TMKIT_CUDA_CHECK(cudaMemcpy(raw.get(), w.qweight.data(), w.qweight.size() * 4, cudaMemcpyHostToDevice));
  TMKIT_CUDA_CHECK(cudaMemcpy(scales_.get(), w.scales.data(), w.scales.size() * 2, cudaMemcpyHostToDevice));
  TMKIT_CUDA_CHECK(cudaMemcpy(zeros_.get(), w.zeros.data(), w.zeros.size() * 2, cudaMemcpyHostToDevice));
  cuda::w4_pack(raw.get(), K, N, packed_.get(), nullptr);
  if (N % 16 == 0) {  // the streaming and wgmma kernels' scales
    scale_zero_.resize(w.scales.size());
    cuda::w4_pack_scale_zero(scales_.get(), zeros_.get(), K, N, scale_zero_.get(), nullptr);
  }
  TMKIT_CUDA_CHECK(cudaDeviceSynchronize());  // `raw` is freed on return
}

size_t W4Linear::scratch_for(Path p, int M) const {
  switch (p) {
    case Path::kDense: return size_t(K) * size_t(N);
    case Path::kWgmma: return cuda::staged_rows(M) * size_t(K);
    default: return 0;
  }
}

int W4Linear::run(cublasHandle_t blas, const __half* x, int M, const cuda::GemvOut<__half>& out,
                  cuda::DeviceBuffer<__half>& scratch, cudaStream_t st, Path path, bool x_staged) const {
  const Path p = choose(M, path);
  if (x_staged && p != Path::kWgmma)
    fail("internal: int4 linear [{}, {}] given staged x for {} rows, which do not take the wgmma GEMM", K, N, M);
  if (streams(M, path)) return cuda::w4a16_stream(x, M, K, N, packed_.get(), scale_zero_.get(), out, st);
  if (out.act || out.residual || out.fold_in.ss)
    fail("int4 linear [{}, {}]: {} rows take a kernel that writes only the plain product", K, N, M);
  float* y = out.y;
  if (!x_staged) scratch.resize(scratch_for(p, M));
  switch (p) {
    case Path::kGemv: cuda::w4a16_gemv(x, M, K, N, packed_.get(), scales_.get(), zeros_.get(), y, st); return 0;
    case Path::kGemm: cuda::w4a16_gemm(x, M, K, N, packed_.get(), scales_.get(), zeros_.get(), y, st); return 0;
    case Path::kWgmma:
      if (!x_staged) cuda::w4_stage_x(x, M, K, scratch.get(), st);
      cuda::w4a16_wgmma(x_staged ? x : scratch.get(), M, K, N, packed_.get(), scale_zero_.get(), y, st);
      return 0;
    default: break;
  }
  cuda::w4_dequant_packed(packed_.get(), scales_.get(), zeros_.get(), K, N, scratch.get(), st);
  const float one = 1.0f, zero = 0.0f;
  TMKIT_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, scratch.get(), CUDA_R_16F, N, x,
                                  CUDA_R_16F, K, &zero, y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return 0;
}

std::vector<float> gpu_w4a16_matmul(const Int4Linear& w, const std::vector<uint16_t>& x, int M, int path) {
  if (int64_t(x.size()) != M * w.K) fail("gpu_w4a16_matmul: x has {} values, expected {}", x.size(), M * w.K);
  const W4Linear d(w);
  cuda::DeviceBuffer<__half> xd(x.size()), scratch;
  cuda::DeviceBuffer<float> y(size_t(M) * w.N);
  TMKIT_CUDA_CHECK(cudaMemcpy(xd.get(), x.data(), x.size() * 2, cudaMemcpyHostToDevice));
  cublasHandle_t blas = nullptr;
  TMKIT_CUBLAS_CHECK(cublasCreate(&blas));
  d.run(blas, xd.get(), M, y.get(), scratch, nullptr, W4Linear::Path(path));
  std::vector<float> out(size_t(M) * w.N);
  const cudaError_t err = cudaMemcpy(out.data(), y.get(), out.size() * 4, cudaMemcpyDeviceToHost);
  cublasDestroy(blas);
  TMKIT_CUDA_CHECK(err);
  return out;
}

}  // namespace tmkit
