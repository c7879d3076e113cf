// Round-to-nearest W4 quantization (asymmetric, per group of g input channels), exactly the
// reference quantizer of ../shared/specs/awq.md §4 computed in fp16 as AutoAWQ / llm-awq do:
//   scale = clamp(max - min, 1e-5) / 15, zero = clamp(-round(min / scale), 0, 15),
//   q = clamp(round(w / scale) + zero, 0, 15), round = half to even.
// Also the whole-workspace version: an fp16/bf16 TurboMind workspace in, an int4 one out (every
// decoder linear quantized; embeddings, norms, biases and LM head stay fp16).
#pragma once
#include "file_io.h"
#include "int4.h"

namespace tmkit {

// w: [K, N] row-major (a workspace linear, K = input channels); K % group == 0, N % 8 == 0.
Int4Linear quantize_rtn(const float* w, int64_t K, int64_t N, int64_t group);

struct RtnReport {
  int64_t linears = 0;
  double seconds = 0;
};
RtnReport quantize_workspace_rtn(const fs::path& src, const fs::path& dst, int64_t group, bool force);

}  // namespace tmkit
