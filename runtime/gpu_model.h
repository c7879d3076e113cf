// The CUDA runtime of tm-eval: the same forward pass as the CPU oracle, on the GPU with the
// workspace's fp16/bf16 weights (kernels in cuda/, dense products through cuBLAS). In a build
// without CUDA, available() is false and constructing one fails with a clear message.
#pragma once
#include <memory>
#include <string>

#include "model_weights.h"

namespace tmkit {

class GpuModel {
 public:
  static bool available();  // this build has CUDA and a device is present
  explicit GpuModel(const ModelWeights& w);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  const TmConfig& config() const;
  std::string device_name() const;
  // Logits [T, vocab_size] of one sequence, copied to the host (for `tm-eval logits` and tests).
  Mat forward(const int32_t* tokens, int64_t T);
  // Sum and sum of squares of -log p(tokens[t] | tokens[<t]) for t = 1..T-1, reduced on the device.
  void nll_sums(const int32_t* tokens, int64_t T, double* sum, double* sum_sq);

  struct Impl;  // per element type, in gpu_model.cc

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace tmkit
