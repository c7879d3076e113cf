// The KV cache's number formats, as TurboMind stores them (lmdeploy >= 0.4). Every runtime of
// tmkit applies exactly these roundings to K (after bias and RoPE) and V wherever they would enter
// the cache, so that attention over a cache equals attention over one full forward:
// - kFp16 (quant_policy 0): K and V rounded to fp16 (round to nearest even). The references'
//   ppl_fp16 protocol runs fp16 too.
// - kInt8 / kInt4 (quant_policy 8 / 4): online quantization per token and per kv head, separately
//   for K and V, asymmetric over the head's D channels:
//     scale = (max - min) / (2^bits - 1), zero = min   (both stored in fp16 next to the codes)
//     q = min(rint((x - zero) / scale), 2^bits - 1),   x' = q * scale + zero
// A forward without a cache (perplexity) applies them as round-trips on K and V before attention;
// the GPU cache (cuda/kv_cache.h) stores fp16 values or the codes with their scale and zero, and
// its readers give back x' bit for bit.
// - static int8 / int4 (`--kv-scales static`, from kv-calibrate): the same codes, with fixed fp32
//   parameters per layer, kv head and channel instead of per token (calib/kv_calibrate.h says how
//   they are chosen):  q = min(max(rint((x - zero_c) / scale_c), 0), 2^bits - 1),  x' = q scale_c + zero_c
#pragma once
#include <cmath>
#include <string>
#include <vector>

#include "dtype.h"
#include "kv_stats.h"
#include "turbomind.h"

namespace tmkit {

enum class KvMode { kFp16 = 0, kInt8 = 8, kInt4 = 4 };

bool parse_kv_mode(const std::string& s, KvMode* out);
const char* kv_mode_name(KvMode m);

// Quantizes and dequantizes n values in place (one head of one token).
inline void kv_fake_quant(float* x, int n, int bits) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::fmin(lo, x[i]);
    hi = std::fmax(hi, x[i]);
  }
  const float qmax = float((1 << bits) - 1);
  const float scale = half_to_float(float_to_half((hi - lo) / qmax)), zero = half_to_float(float_to_half(lo));
  for (int i = 0; i < n; ++i) {
    const float q = scale > 0 ? std::fmin(std::fmax(std::nearbyint((x[i] - zero) / scale), 0.0f), qmax) : 0.0f;
    x[i] = q * scale + zero;
  }
}

// The KV cache's format: a mode, and for int8/int4 either online (per token) or static parameters.
struct KvQuant {
  KvMode mode = KvMode::kFp16;
  std::vector<KvStaticLayer> layers;  // empty: online; else one per model layer
  KvQuant(KvMode m = KvMode::kFp16) : mode(m) {}  // NOLINT: a mode alone is the online format
  bool is_static() const { return !layers.empty(); }
  int bits() const { return mode == KvMode::kFp16 ? 16 : int(mode); }
  std::string name() const { return std::string(kv_mode_name(mode)) + (is_static() ? " static" : ""); }
};

// The KV format `mode` of a workspace: online, or with `static_scales` the kv-calibrate parameters
// for mode's bits read from every rank's file (fails naming the workspace when it is uncalibrated
// and the file when one is missing or of the wrong size). fp16 has no scales.
KvQuant load_kv_quant(const fs::path& workspace, const TmConfig& cfg, KvMode mode, bool static_scales);

// Quantizes and dequantizes n values in place with per-value parameters (static scales).
inline void kv_static_fake_quant(float* x, int n, const float* scale, const float* zero, int bits) {
  const float qmax = float((1 << bits) - 1);
  for (int i = 0; i < n; ++i) {
    const float q = scale[i] > 0 ? std::fmin(std::fmax(std::nearbyint((x[i] - zero[i]) / scale[i]), 0.0f), qmax) : 0.0f;
    x[i] = q * scale[i] + zero[i];
  }
}

// What the cache gives back for n values of one head of one token, in place (see the top).
inline void kv_cache_roundtrip(float* x, int n, KvMode mode) {
  if (mode == KvMode::kFp16) {
    for (int i = 0; i < n; ++i) x[i] = half_to_float(float_to_half(x[i]));
  } else {
    kv_fake_quant(x, n, int(mode));
  }
}

}  // namespace tmkit
