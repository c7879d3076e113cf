// One device's share of the GPU model (RankModel): the whole model at tp 1, or one rank's slice
// of it (tp_split.h) under tensor parallelism. It owns that device's weights, activations, KV cache
// and decode graph, and enqueues the forward pass as kernels (cuda/) on its stream; GpuModel
// (gpu_model.cc) owns the ranks, their threads and the NCCL communicators.
#pragma once
#include <memory>
#include <vector>

#include "cuda/cuda_utils.h"
#include "kv_quant.h"
#include "model_weights.h"

#ifdef TMKIT_HAVE_NCCL
#include <nccl.h>
#define TMKIT_NCCL_CHECK(expr)                                                                            \
  do {                                                                                                     \
    ncclResult_t r_ = (expr);                                                                              \
    if (r_ != ncclSuccess) ::tmkit::fail("NCCL error at {}:{}: {}", __FILE__, __LINE__, ncclGetErrorString(r_)); \
  } while (0)
#endif

namespace tmkit {

// The model on one device: the whole model (tp 1) or one rank's share of it.
struct RankModel {
  virtual ~RankModel() = default;
  TmConfig cfg;  // this rank's heads and inter_size
  KvMode kv = KvMode::kFp16;
  int rank = 0;
  // Static KV parameters of this rank's kv heads, per layer [k_scale | k_zero | v_scale | v_zero]
  // (empty: online); KV statistics [layer][9][kv heads * D] are folded into kv_stats_d while set.
  std::vector<cuda::DeviceBuffer<float>> kv_static;
  cuda::DeviceBuffer<float> kv_stats_d;
  bool collect_kv_stats = false;
  // Pass two of a calibration: per layer, ranges [lo: 2 n | hi: 2 n] and counts [2 n][bins] of K
  // before RoPE and V (n = kv heads * D), counted while collect_kv_hist is set.
  cuda::DeviceBuffer<float> kv_hist_ranges;
  cuda::DeviceBuffer<unsigned> kv_hist_d;
  bool collect_kv_hist = false;
#ifdef TMKIT_HAVE_NCCL
  ncclComm_t comm = nullptr;  // tp > 1
#endif
  // A forward in two steps, so that all ranks have passed every check before any of them enters a
  // collective (a rank that failed alone would leave the others waiting in an all-reduce forever).
  // stage() takes B sequences of T tokens (tokens: B * T ids, sequence-major, alive until launch()
  // returns), checks them, sizes the buffers and captures the decode graph; launch() runs the
  // forward and leaves its logits on the device. With `use_cache`, the tokens follow the cached
  // ones and their K/V are appended to the cache. With `nll_only`, the logits are not kept: nll
  // holds -log p(next id) of every row but the last (the LM head runs in slabs of rows, so no
  // [B T, vocab] buffer is needed). Ranks other than 0 stop before the LM head. launch() only
  // enqueues on `stream`; finish() books the forward once the stream is done.
  virtual void stage(const int32_t* tokens, int64_t B, int64_t T, bool use_cache, bool nll_only) = 0;
  virtual void launch() = 0;
  virtual void finish() = 0;
  cudaStream_t stream = nullptr;
  virtual void reset(int64_t capacity, int64_t batch) = 0;
  // One all-reduce and a wait: NCCL connects the ranks here, outside any graph capture.
  virtual void warm_up() = 0;
  virtual size_t cache_bytes() const = 0;
  int64_t cached = 0, last_rows = 0, cache_batch = 0;
  virtual const float* logits() const = 0;
  cuda::DeviceBuffer<float> nll;
};

// Rank `rank`'s model from its weights (the whole model's at tp 1), with fp16 activations or else bf16.
std::unique_ptr<RankModel> make_rank_model(const ModelWeights& w, KvMode kv, int rank, bool fp16);

}  // namespace tmkit
