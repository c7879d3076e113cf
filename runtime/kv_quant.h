// KV-cache quantization as TurboMind does it online (lmdeploy >= 0.4, quant_policy 8 / 4): per
// token and per kv head, separately for K (after bias and RoPE) and V, asymmetric over the head's
// D channels:
//   scale = (max - min) / (2^bits - 1), zero = min   (both stored in fp16 next to the codes)
//   q = min(rint((x - zero) / scale), 2^bits - 1),   x' = q * scale + zero
// Perplexity runs apply it as quantize-then-dequantize on K and V before attention, which is what
// attention reading the quantized cache sees. kFp16 keeps K and V at full precision.
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

}  // namespace tmkit
