// Round-to-nearest W4 quantization (asymmetric, per group of g input channels), exactly the
// reference quantizer of ../shared/specs/awq.md §4 computed in fp16 as AutoAWQ / llm-awq do:
//   scale = clamp(max - min, 1e-5) / 15, zero = clamp(-round(min / scale), 0, 15),
//   q = clamp(round(w / scale) + zero, 0, 15), round = half to even.
// Also the whole-workspace version: an fp16/bf16 TurboMind workspace in, an int4 one out (every
// decoder linear quantized; embeddings, norms, biases and LM head stay fp16).
#pragma once
#include <cmath>

#include "file_io.h"
#include "int4.h"

namespace tmkit {

// The reference quantizer on one group, every step rounded to fp16 as the reference computes it:
// parameters from the group's min and max (of fp16-rounded weights), then codes and dequantized
// values. Shared by RTN and the AWQ search's pseudo-quantization.
inline float fp16_round(float x) { return half_to_float(float_to_half(x)); }
struct QuantGroup {
  float scale, zero;
};
inline QuantGroup quant_group(float lo, float hi) {
  const float scale = fp16_round(std::fmax(fp16_round(hi - lo), 1e-5f) / 15.0f);
  return {scale, std::fmin(std::fmax(-std::nearbyint(fp16_round(lo / scale)), 0.0f), 15.0f)};
}
inline float quant_code(float w, QuantGroup g) {  // w already fp16-rounded
  return std::fmin(std::fmax(std::nearbyint(fp16_round(w / g.scale)) + g.zero, 0.0f), 15.0f);
}
inline float dequant(float code, QuantGroup g) { return fp16_round((code - g.zero) * g.scale); }

// w: [K, N] row-major (a workspace linear, K = input channels); K % group == 0, N % 8 == 0.
Int4Linear quantize_rtn(const float* w, int64_t K, int64_t N, int64_t group);

struct RtnReport {
  int64_t linears = 0;
  double seconds = 0;
};
RtnReport quantize_workspace_rtn(const fs::path& src, const fs::path& dst, int64_t group, bool force);

}  // namespace tmkit
