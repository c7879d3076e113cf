// The CUDA runtime of tm-eval: the same forward pass as the CPU oracle, on the GPU with the
// workspace's fp16/bf16 weights (kernels in cuda/, dense products through cuBLAS). In a build
// without CUDA, available() is false and constructing one fails with a clear message.
#pragma once
#include <memory>
#include <string>

#include "kv_quant.h"
#include "model_weights.h"

namespace tmkit {

// The W4A16 product the GPU model uses, on its own: y[M, N] = x[M, K] (fp16 bits) * w. M <= 16 runs
// the int4 GEMV kernel, longer inputs dequantize to fp16 and use cuBLAS. For tests and benchmarks.
std::vector<float> gpu_w4a16_matmul(const Int4Linear& w, const std::vector<uint16_t>& x, int M);

// The GPU's KV quantize-dequantize on its own, on a host qkv buffer [T, (H + 2 KV) D]. For tests.
void gpu_kv_fake_quant(std::vector<float>& qkv, int T, int H, int KV, int D, int bits);

class GpuModel {
 public:
  static bool available();  // this build has CUDA and a device is present
  explicit GpuModel(const ModelWeights& w, KvMode kv = KvMode::kFp16);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  const TmConfig& config() const;
  std::string device_name() const;
  // Logits [T, vocab_size] of one sequence, copied to the host (for `tm-eval logits` and tests).
  Mat forward(const int32_t* tokens, int64_t T);
  // Sum and sum of squares of -log p(tokens[t] | tokens[<t]) for t = 1..T-1, reduced on the device.
  void nll_sums(const int32_t* tokens, int64_t T, double* sum, double* sum_sq);

  // Generation over a KV cache: reset() starts a sequence with room for `capacity` tokens;
  // append() runs tokens after those already cached (a prompt, then one token per decode step),
  // leaving their logits on the device; last_logits() copies the last append's [T, vocab] back.
  void reset(int64_t capacity);
  void append(const int32_t* tokens, int64_t T);
  Mat last_logits() const;
  int64_t position() const;
  void synchronize() const;

  struct Impl;  // per element type, in gpu_model.cc

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace tmkit
