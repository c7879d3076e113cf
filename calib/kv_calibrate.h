// KV-cache calibration runs: the model over calibration blocks, every layer's K and V folded into
// KvStats (formats/kv_stats.h), on the CPU oracle or the GPU runtime. The kv-calibrate tool
// (kv-calibrate/) writes the result into a workspace.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "cpu_forward.h"
#include "kv_stats.h"

namespace tmkit {

using KvCalibProgress = std::function<void(int64_t done, int64_t total)>;

// Statistics of `blocks` (samples x seqlen ids, row-major) through the CPU oracle, `threads`
// blocks at a time, in two passes: the extremes, then histograms within them, from which the int4
// ranges are set (formats/kv_stats.h). `progress` after each block of either pass, in order.
KvStats kv_stats_cpu(const CpuModel& model, const std::vector<int32_t>& blocks, int64_t samples, int64_t seqlen,
                     int threads, const KvCalibProgress& progress = {});

// The same through the GPU runtime (fp16 activations, as the references run), `batch` blocks per
// forward. Fails without CUDA.
KvStats kv_stats_gpu(const ModelWeights& weights, const std::vector<int32_t>& blocks, int64_t samples, int64_t seqlen,
                     int64_t batch, const KvCalibProgress& progress = {});

}  // namespace tmkit
