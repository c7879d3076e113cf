// The CPU oracle: TurboMind's forward pass written for clarity in Eigen fp32. Every CUDA kernel
// and quantizer of tmkit is checked against it. One sequence at a time, positions 0..T-1.
#pragma once
#include <cstdint>

#include "kv_quant.h"
#include "model_weights.h"

namespace tmkit {

class CpuModel {
 public:
  explicit CpuModel(ModelWeights w, KvMode kv = KvMode::kFp16) : w_(std::move(w)), kv_(kv) {}
  const TmConfig& config() const { return w_.cfg; }
  // Logits [T, vocab_size] (padding rows of the LM head dropped). Thread-safe.
  Mat forward(const int32_t* tokens, int64_t T) const;

 private:
  ModelWeights w_;
  KvMode kv_;
};

}  // namespace tmkit
