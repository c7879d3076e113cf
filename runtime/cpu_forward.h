// The CPU oracle: TurboMind's forward pass written for clarity in Eigen fp32. Every CUDA kernel
// and quantizer of tmkit is checked against it. One sequence at a time, positions 0..T-1.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

#include "kv_quant.h"
#include "model_weights.h"

namespace tmkit {

// The oracle's building blocks, also used by the CPU AWQ search (quantizers/awq_search.cc):
// y = x / rms(x) * w per row, and causal GQA attention of one sequence (query head h reads kv
// head h / (H / KV); q, k after RoPE; `scale` multiplies the scores).
Mat rms_norm(const Mat& x, const Vec& w, double eps);
Mat attention(const Mat& q, const Mat& k, const Mat& v, int64_t H, int64_t KV, int64_t D, float scale);

// Sees every layer's K before RoPE, K after it and V (all after bias), [T, KV * D], unrounded.
using KvObserver = std::function<void(int64_t layer, const Mat& k_pre_rope, const Mat& k, const Mat& v)>;

class CpuModel {
 public:
  explicit CpuModel(ModelWeights w, KvQuant kv = {});
  const TmConfig& config() const { return w_.cfg; }
  // Logits [T, vocab_size] (padding rows of the LM head dropped). Thread-safe.
  Mat forward(const int32_t* tokens, int64_t T) const { return forward(tokens, T, nullptr); }
  Mat forward(const int32_t* tokens, int64_t T, const KvObserver* observe) const;
  // About the most memory one forward of T tokens holds at once besides the weights (fp32
  // activations, a head's [T, T] attention scores, the [T, vocab] logits): for refusing a -c the
  // host cannot hold before starting.
  uint64_t forward_bytes(int64_t T) const;

 private:
  ModelWeights w_;
  KvQuant kv_;
};

// Refuses (an Error naming `flag`, e.g. "-c") `concurrent` forwards of T tokens at once that the
// host's available memory cannot hold, before any work rather than in an allocation halfway.
void check_host_memory(const CpuModel& model, int64_t T, int64_t concurrent, const std::string& flag);

}  // namespace tmkit
