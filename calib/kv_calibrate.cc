#include "kv_calibrate.h"

#include <algorithm>
#include <exception>
#include <thread>

#include "error.h"
#include "gpu_model.h"

namespace tmkit {

KvStats kv_stats_cpu(const CpuModel& model, const std::vector<int32_t>& blocks, int64_t samples, int64_t seqlen,
                     int threads, const KvCalibProgress& progress) {
  const TmConfig& c = model.config();
  if (int64_t(blocks.size()) != samples * seqlen) fail("KV statistics: {} ids for {} x {} blocks", blocks.size(), samples, seqlen);
  KvStats total(c.num_layer, c.kv_head_num, c.size_per_head);
  // Blocks run `threads` at a time, each into its own statistics, merged in block order.
  for (int64_t b0 = 0; b0 < samples; b0 += threads) {
    const int64_t n = std::min<int64_t>(threads, samples - b0);
    std::vector<KvStats> part(size_t(n), KvStats(c.num_layer, c.kv_head_num, c.size_per_head));
    std::vector<std::exception_ptr> errors{size_t(n)};
    std::vector<std::thread> pool;
    for (int64_t i = 0; i < n; ++i)
      pool.emplace_back([&, i] {
        try {
          const KvObserver obs = [&](int64_t layer, const Mat& kr, const Mat& k, const Mat& v) {
            part[size_t(i)].observe(layer, k.rows(), kr.data(), k.data(), v.data(), k.cols());
          };
          model.forward(blocks.data() + (b0 + i) * seqlen, seqlen, &obs);
        } catch (...) {
          errors[size_t(i)] = std::current_exception();
        }
      });
    for (std::thread& t : pool) t.join();
    for (int64_t i = 0; i < n; ++i) {
      if (errors[size_t(i)]) std::rethrow_exception(errors[size_t(i)]);
      total.merge(part[size_t(i)]);
      if (progress) progress(b0 + i + 1, samples);
    }
  }
  return total;
}

KvStats kv_stats_gpu(const ModelWeights& weights, const std::vector<int32_t>& blocks, int64_t samples, int64_t seqlen,
                     int64_t batch, const KvCalibProgress& progress) {
  if (int64_t(blocks.size()) != samples * seqlen) fail("KV statistics: {} ids for {} x {} blocks", blocks.size(), samples, seqlen);
  GpuModel gpu(weights);
  const TmConfig& c = weights.cfg;
  KvStats total(c.num_layer, c.kv_head_num, c.size_per_head);
  for (int64_t b0 = 0; b0 < samples; b0 += batch) {
    const int64_t n = std::min(batch, samples - b0);
    total.merge(gpu.kv_stats(blocks.data() + b0 * seqlen, n, seqlen));
    if (progress) progress(b0 + n, samples);
  }
  return total;
}

}  // namespace tmkit
