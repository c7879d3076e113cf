// KV-cache calibration data (kv-calibrate writes it, tm-eval and tm-shard read it): statistics of
// every layer's K (after bias, before and after RoPE) and V, the static scales derived from them,
// and the files that carry both in a TurboMind workspace (names and layouts: turbomind.h).
// Collecting the statistics (running the model) is calib/kv_calibrate.h's.
//
// Static parameters, per layer, kv head and channel, separately for K and V (what tm-eval's
// `--kv-scales static` uses): the channel's calibrated range [min, max] mapped onto the codes,
//   scale = (max - min) / (2^bits - 1),  zero = min,
// asymmetric like TurboMind's online scheme but fixed. K's ranges are those of K *before* RoPE
// (KVQuant's observation), and K is quantized there. Measured on small-llama, int4, 40 chunks of
// ctx 512 (fp16 KV 135.86, online per-token 139.69):
//   per head, post-RoPE 160.9 | per channel, post-RoPE 147.6 (143.0 with an MSE clip search)
//   per channel, pre-RoPE 139.3 (clip search: 139.6, so none)
// Why: a channel's pre-RoPE values sit around a large mean; RoPE turns each pair's mean around
// the circle with the position, so post-RoPE ranges cover +-(|mean| + spread) and waste the codes.
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
// and metadata (tokens, and what the caller adds). Read back with read_kv_stats, which checks
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
