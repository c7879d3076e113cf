#include "kv_calibrate.h"

#include <algorithm>
#include <exception>
#include <thread>

#include "error.h"
#include "gpu_model.h"

namespace tmkit {

namespace {

// Runs every block through the CPU oracle, `threads` at a time, each into its own copy of `empty`,
// folded into `total` in block order; `progress` counts both passes' blocks.
template <typename Acc, typename Observe>
void cpu_pass(const CpuModel& model, const std::vector<int32_t>& blocks, int64_t samples, int64_t seqlen, int threads,
              const Acc& empty, Acc* total, const Observe& observe, int64_t done0, int64_t total_blocks, const KvCalibProgress& progress) {
  for (int64_t b0 = 0; b0 < samples; b0 += threads) {
    const int64_t n = std::min<int64_t>(threads, samples - b0);
    std::vector<Acc> part(size_t(n), empty);
    std::vector<std::exception_ptr> errors{size_t(n)};
    std::vector<std::thread> pool;
    for (int64_t i = 0; i < n; ++i)
      pool.emplace_back([&, i] {
        try {
          const KvObserver obs = [&](int64_t layer, const Mat& kr, const Mat& k, const Mat& v) {
            observe(&part[size_t(i)], layer, kr, k, v);
          };
          model.forward(blocks.data() + (b0 + i) * seqlen, seqlen, &obs);
        } catch (...) {
          errors[size_t(i)] = std::current_exception();
        }
      });
    for (std::thread& t : pool) t.join();
    for (int64_t i = 0; i < n; ++i) {
      if (errors[size_t(i)]) std::rethrow_exception(errors[size_t(i)]);
      total->merge(part[size_t(i)]);
      if (progress) progress(done0 + b0 + i + 1, total_blocks);
    }
  }
}

void check_blocks(const std::vector<int32_t>& blocks, int64_t samples, int64_t seqlen) {
  if (int64_t(blocks.size()) != samples * seqlen) fail("KV statistics: {} ids for {} x {} blocks", blocks.size(), samples, seqlen);
}

}  // namespace

KvStats kv_stats_cpu(const CpuModel& model, const std::vector<int32_t>& blocks, int64_t samples, int64_t seqlen,
                     int threads, const KvCalibProgress& progress) {
  check_blocks(blocks, samples, seqlen);
  const TmConfig& c = model.config();
  const KvStats empty(c.num_layer, c.kv_head_num, c.size_per_head);
  KvStats stats = empty;
  cpu_pass(model, blocks, samples, seqlen, threads, empty, &stats,
           [](KvStats* s, int64_t layer, const Mat& kr, const Mat& k, const Mat& v) {
             s->observe(layer, k.rows(), kr.data(), k.data(), v.data(), k.cols());
           }, 0, 2 * samples, progress);
  const KvHistograms no_counts(stats);
  KvHistograms hist = no_counts;
  cpu_pass(model, blocks, samples, seqlen, threads, no_counts, &hist,
           [](KvHistograms* h, int64_t layer, const Mat& kr, const Mat&, const Mat& v) {
             h->observe(layer, kr.rows(), kr.data(), v.data(), kr.cols());
           }, samples, 2 * samples, progress);
  kv_int4_ranges(hist, &stats);
  return stats;
}

KvStats kv_stats_gpu(const ModelWeights& weights, const std::vector<int32_t>& blocks, int64_t samples, int64_t seqlen,
                     int64_t batch, const KvCalibProgress& progress) {
  check_blocks(blocks, samples, seqlen);
  GpuModel gpu(weights);
  const TmConfig& c = weights.cfg;
  KvStats stats(c.num_layer, c.kv_head_num, c.size_per_head);
  for (int64_t b0 = 0; b0 < samples; b0 += batch) {
    const int64_t n = std::min(batch, samples - b0);
    stats.merge(gpu.kv_stats(blocks.data() + b0 * seqlen, n, seqlen));
    if (progress) progress(b0 + n, 2 * samples);
  }
  KvHistograms hist(stats);
  for (int64_t b0 = 0; b0 < samples; b0 += batch) {
    const int64_t n = std::min(batch, samples - b0);
    gpu.kv_histograms(blocks.data() + b0 * seqlen, n, seqlen, &hist);
    if (progress) progress(samples + b0 + n, 2 * samples);
  }
  kv_int4_ranges(hist, &stats);
  return stats;
}

}  // namespace tmkit
