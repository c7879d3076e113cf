// The AutoAWQ "GEMM" checkpoint (../shared/specs/awq.md §6.1, §6.4): what vLLM, transformers and
// LMDeploy load as an AWQ model. Per quantized linear `<name>` (HF W[out = N, in = K]):
//   <name>.qweight  int32 [K, N/8]    4-bit codes, transposed to [in, out], 8 output channels a word:
//                                     nibble i of word j = column 8j + kAwqOrder[i]
//   <name>.qzeros   int32 [K/g, N/8]  integer zero points, packed the same way
//   <name>.scales   fp16  [K/g, N]
//   <name>.bias     fp16  [N]         when the linear has one
// Everything else (embeddings, norms, LM head) as fp16; config.json gains quantization_config.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "file_io.h"
#include "int4.h"

namespace tmkit {

// (The packing itself, awq_pack / awq_unpack, lives in formats/int4.h: hf2tm reads it too.)

// The codes [K, N] of a TurboMind-layout int4 linear, and its zero points [K/g, N] as codes.
std::vector<uint8_t> int4_codes(const Int4Linear& q);
std::vector<uint8_t> int4_zero_codes(const Int4Linear& q);

struct HfAwqReport {
  int64_t linears = 0;                      // quantized
  std::vector<std::string> not_converted;   // module names kept fp16 (--skip-indivisible)
  std::vector<std::string> files;  // weight files written
  double seconds = 0;
};

// Quantizes every decoder linear of an HF Llama / Mistral / Qwen2 checkpoint (the quantizer of
// rtn.h, in fp16 as the reference tools) and writes the AutoAWQ GEMM checkpoint to `dst`
// (atomically), shards of at most `max_shard_bytes`, tokenizer and generation files copied.
// `replaced`: tensors to take instead of the checkpoint's (by HF name, HF shape, fp32), e.g. the
// AWQ search's scaled and clipped weights and norms; `packed`: linears already quantized (by the
// HF weight name), written as they are. Without either this is plain RTN.
// `skip_indivisible`: a linear whose input channels do not split into groups stays fp16 (listed
// in quantization_config.modules_to_not_convert) instead of failing.
HfAwqReport write_hf_awq(const fs::path& src, const fs::path& dst, int64_t group, bool force,
                         const std::map<std::string, std::vector<float>>* replaced = nullptr,
                         const std::map<std::string, AwqPackedLinear>* packed = nullptr, bool skip_indivisible = false,
                         uint64_t max_shard_bytes = 5'000'000'000ull);
inline HfAwqReport write_hf_awq_rtn(const fs::path& src, const fs::path& dst, int64_t group, bool force) {
  return write_hf_awq(src, dst, group, force);
}

}  // namespace tmkit
