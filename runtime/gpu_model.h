// The CUDA runtime of tm-eval: the same forward pass as the CPU oracle, on the GPU with the
// workspace's fp16/bf16 weights (kernels in cuda/, dense products through cuBLAS). In a build
// without CUDA, available() is false and constructing one fails with a clear message.
// With tp > 1 the model runs tensor-parallel on devices 0 .. tp-1 (tp_split.h's shares, NCCL
// all-reduce after wo and w2, one host thread per device); every method then acts on all ranks
// and returns rank 0's results, the same values as tp 1 up to float summation order.
#pragma once
#include <memory>
#include <string>

#include "kv_quant.h"
#include "model_weights.h"

namespace tmkit {

// The W4A16 product the GPU model uses, on its own: y[M, N] = x[M, K] (fp16 bits) * w, by the
// kernel W4Linear picks for M (path 0) or a forced one (W4Linear::Path 1 gemv, 2 gemm, 3 dense, 4 wgmma).
// For tests and benchmarks.
std::vector<float> gpu_w4a16_matmul(const Int4Linear& w, const std::vector<uint16_t>& x, int M, int path = 0);

// The GPU's KV quantize-dequantize on its own, on a host qkv buffer [T, (H + 2 KV) D]. For tests.
void gpu_kv_fake_quant(std::vector<float>& qkv, int T, int H, int KV, int D, int bits);

// The GPU's KV cache on its own: appends a host qkv buffer [T, (H + 2 KV) D] at positions 0 .. T-1
// of a one-sequence cache in `mode`, copies the stored bytes back and decodes them on the host by
// the documented layout (cuda/kv_cache.h) into k, v [KV][T][D]. Returns the cache's bytes. For tests.
size_t gpu_kv_cache_roundtrip(const std::vector<float>& qkv, int T, int H, int KV, int D, KvMode mode,
                              std::vector<float>* k, std::vector<float>* v);

// Starts the CUDA context on a background thread, so that its setup (a few hundred ms) overlaps
// the caller's file reading; CUDA calls made meanwhile wait for it. Does nothing without CUDA.
void gpu_start_context();

class GpuModel {
 public:
  static bool available();  // this build has CUDA and a device is present
  static int device_count();  // CUDA devices present (0 without CUDA)
  // tp > 1 needs NCCL in the build and tp devices; fails with one line saying what is missing, or
  // which of the model's dimensions tp does not divide (tp_split.h).
  explicit GpuModel(const ModelWeights& w, const KvQuant& kv = {}, int tp = 1);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  const TmConfig& config() const;
  std::string device_name() const;  // e.g. "NVIDIA H200, fp16", "2 x NVIDIA H200, fp16, tp 2"
  int tp() const;
  // Logits [T, vocab_size] of one sequence, copied to the host (for `tm-eval logits` and tests).
  Mat forward(const int32_t* tokens, int64_t T);
  // Logits [batch * T, vocab_size] of `batch` sequences of T tokens in one forward (tokens and rows
  // sequence-major: row b * T + t is token t of sequence b).
  Mat forward_batch(const int32_t* tokens, int64_t batch, int64_t T);
  // Sum and sum of squares of -log p(tokens[t] | tokens[<t]) for t = 1..T-1, reduced on the device.
  void nll_sums(const int32_t* tokens, int64_t T, double* sum, double* sum_sq);
  // The same for `batch` sequences of T tokens at once (tokens holds batch * T ids, sequence-major):
  // one forward with batch * T rows in every GEMM, attention per sequence; sums[b], sums_sq[b].
  void nll_sums_batch(const int32_t* tokens, int64_t batch, int64_t T, double* sums, double* sums_sq);
  // KV statistics (formats/kv_stats.h) of `batch` sequences of T tokens, reduced on the device.
  KvStats kv_stats(const int32_t* tokens, int64_t batch, int64_t T);
  // Pass two: counts the same rows into `hist` (over its ranges).
  void kv_histograms(const int32_t* tokens, int64_t batch, int64_t T, KvHistograms* hist);

  // Generation over a KV cache: reset() starts `batch` sequences with room for `capacity` tokens
  // each; append() runs T tokens of every sequence after those already cached (a prompt, then one
  // token per decode step; tokens holds batch * T ids, sequence-major: the sequences advance in
  // lockstep), leaving their logits on the device; last_logits() copies the last append's
  // [batch * T, vocab] back. Fails with one line when the cache does not fit the device.
  void reset(int64_t capacity, int64_t batch = 1);
  void append(const int32_t* tokens, int64_t T);
  Mat last_logits() const;
  int64_t position() const;
  int64_t batch() const;
  // Device bytes the KV cache given to reset() takes (K and V, codes and scales, every layer).
  size_t kv_cache_bytes() const;
  void synchronize() const;

  struct Impl;  // the ranks, in gpu_model.cc

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace tmkit
