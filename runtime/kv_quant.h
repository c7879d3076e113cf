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
#pragma once
#include <cmath>
#include <string>

#include "dtype.h"

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

// What the cache gives back for n values of one head of one token, in place (see the top).
inline void kv_cache_roundtrip(float* x, int n, KvMode mode) {
  if (mode == KvMode::kFp16) {
    for (int i = 0; i < n; ++i) x[i] = half_to_float(float_to_half(x[i]));
  } else {
    kv_fake_quant(x, n, int(mode));
  }
}

}  // namespace tmkit
