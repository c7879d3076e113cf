// KV-cache calibration data (kv-calibrate writes it, tm-eval and tm-shard read it): statistics of
// every layer's K (after bias, before and after RoPE) and V, the static scales derived from them,
// and the files that carry both in a TurboMind workspace (names and layouts: turbomind.h).
// Collecting the statistics (running the model) is calib/kv_calibrate.h's.
//
// Static parameters, per layer, kv head and channel, separately for K and V (what tm-eval's
// `--kv-scales static` uses): a calibrated range [lo, hi] of the channel mapped onto the codes,
//   scale = (hi - lo) / (2^bits - 1),  zero = lo,
// asymmetric like TurboMind's online scheme but fixed. int8 takes the observed [min, max]; int4,
// whose 16 codes an outlier would spread too thin, takes the range of least squared error over
// the calibration values (a search over per-channel histograms, pass two of the calibration).
// K's ranges are those of K *before* RoPE (KVQuant's observation), and K is quantized there.
// Measured on small-llama, int4 (docs/performance.md has the tables): with 4 calibration blocks,
// 40 chunks of ctx 512 (fp16 KV 135.86, online per-token 139.69):
//   per head, post-RoPE 160.9 | per channel, post-RoPE 147.6 | per channel, pre-RoPE 139.3
// Why pre-RoPE: a channel's values sit around a large mean; RoPE turns each pair's mean around
// the circle with the position, so post-RoPE ranges cover +-(|mean| + spread) and waste the codes.
// Why least squares for int4: over all 128 x 2048 calibration tokens [min, max] reaches rare
// extremes, and the whole eval text at ctx 512 gave +2.09% over fp16 KV (online: +1.80%); the
// least-squares ranges give +1.25%. int8's 256 codes lose nothing to the extremes (-0.01%).
// The legacy files (spec §7.1, lmdeploy <= 0.3) reduce the post-RoPE statistics to one range per
// rank, as lmdeploy did.
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "turbomind.h"

namespace tmkit {

struct KvStats {
  enum Tensor { kK, kKPreRope, kV };    // K after RoPE, K before it, V
  enum Stat { kMin, kMax, kAbsmax };
  static constexpr int kStats = 9;      // 3 tensors x 3 statistics
  struct Layer {
    std::array<std::vector<float>, kStats> s;  // [tensor * 3 + stat][kv_heads * head_dim], kv head major
    // The int4 ranges [K-before-RoPE lo, hi, V lo, hi], each [kv_heads * head_dim]: empty until
    // kv_int4_ranges sets them (they are not statistics: merge() drops them).
    std::array<std::vector<float>, 4> int4;
    std::vector<float>& at(Tensor t, Stat st) { return s[size_t(t * 3 + st)]; }
    const std::vector<float>& at(Tensor t, Stat st) const { return s[size_t(t * 3 + st)]; }
  };
  int64_t kv_heads = 0, head_dim = 0;
  int64_t tokens = 0;  // tokens observed (each layer sees all of them)
  std::vector<Layer> layers;

  KvStats() = default;
  KvStats(int64_t layers, int64_t kv_heads, int64_t head_dim);
  // Folds one layer's `rows` rows of kv_heads * head_dim floats in (row-major, `stride` floats
  // apart); layer 0's rows count as tokens.
  void observe(int64_t layer, int64_t rows, const float* k_pre_rope, const float* k, const float* v, int64_t stride);
  void merge(const KvStats& other);  // same shape; min/max/absmax are order-independent
};

// Pass two of a calibration: per layer and channel, histograms of K before RoPE and of V over the
// range [min, max] that pass one (`ranges`) found; values outside (pass two saw other data, or
// rounded differently) count in the edge bins.
struct KvHistograms {
  static constexpr int kBins = 256;
  struct Layer {
    std::vector<float> lo, hi;       // [2 * channels]: K before RoPE, then V
    std::vector<uint64_t> counts;    // [2 * channels * kBins]
  };
  int64_t channels = 0;  // kv_heads * head_dim
  std::vector<Layer> layers;

  explicit KvHistograms(const KvStats& ranges);
  void observe(int64_t layer, int64_t rows, const float* k_pre_rope, const float* v, int64_t stride);
  void merge(const KvHistograms& other);  // same ranges
};

// The bin of x in [lo, hi] (hi <= lo: bin 0), as the GPU's kernel computes it.
inline int kv_hist_bin(float x, float lo, float hi) {
  if (!(hi > lo)) return 0;
  const float b = (x - lo) * (float(KvHistograms::kBins) / (hi - lo));
  return b <= 0.0f ? 0 : b >= float(KvHistograms::kBins - 1) ? KvHistograms::kBins - 1 : int(b);
}

// Sets every layer's int4 ranges from the histograms: per channel, the [lo, hi] inside [min, max]
// whose 4-bit quantization has the least squared error over the histogram (bin centres), found
// by alternating searches of each end over shrinks of 0 .. 45% of the range in 1% steps.
void kv_int4_ranges(const KvHistograms& hist, KvStats* stats);

// Static parameters of one layer, [kv_heads * head_dim] each (kv head major), for K (before RoPE)
// and for V: x' = min(max(rint((x - zero) / scale), 0), 2^bits - 1) * scale + zero.
struct KvStaticLayer {
  std::vector<float> k_scale, k_zero, v_scale, v_zero;
};

// The static parameters for `bits` (8 or 4) of every layer (see the top).
std::vector<KvStaticLayer> kv_static_params(const KvStats& stats, int bits);

// lmdeploy <= 0.3's past_kv_scale of `layer` for `rank` of `tp` (spec §7.1): min and max over the
// rank's contiguous kv heads and all their channels, scale = (max - min) / (2^bits - 1),
// zp = (max + min) / 2: [k_scale, k_zp, v_scale, v_zp].
std::array<float, 4> legacy_kv_scale(const KvStats& stats, int64_t layer, int64_t rank, int64_t tp, int bits);

// kv_stats.safetensors: per layer `layers.{i}.{k,k_prerope,v}.{min,max,absmax}`, fp32 [kv_heads, head_dim],
// `layers.{i}.{k_prerope,v}.int4_range`, fp32 [2 (lo, hi), kv_heads, head_dim], and metadata (tokens, and what the caller adds). Read back with read_kv_stats, which checks
// every tensor's presence, dtype and shape against the workspace config.
void write_kv_stats(const fs::path& path, const KvStats& stats, const std::map<std::string, std::string>& metadata);
KvStats read_kv_stats(const fs::path& path, const TmConfig& cfg);

struct KvCalibrationFiles {
  int legacy_bits = 8;               // --kv-bits: which past_kv_scale files
  int64_t samples = 0, seqlen = 0;   // recorded in config.yaml
  std::string dataset;               // recorded in kv_stats.safetensors' metadata
};

// Writes every KV calibration file of a workspace of `cfg` (its tp) into `weights`: the
// statistics, the static parameters for int8 and for int4 (per rank), the legacy past_kv_scale
// files, and returns `cfg` with its kv_calibration section filled in (the caller writes config.yaml).
// Everything but the statistics derives from them, so tm-shard rewrites it for another tp.
TmConfig write_kv_calibration(const fs::path& weights, const TmConfig& cfg, const KvStats& stats,
                              const KvCalibrationFiles& opt);
// The files derived from the statistics for `cfg`'s tp (static parameters, past_kv_scale).
void write_kv_derived(const fs::path& weights, const TmConfig& cfg, const KvStats& stats, int legacy_bits);
// The names of those files (relative to the weights folder) for `cfg`'s layers and tp.
std::vector<std::string> kv_calibration_files(const TmConfig& cfg);

}  // namespace tmkit
