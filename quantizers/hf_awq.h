// The AutoAWQ "GEMM" checkpoint (../shared/specs/awq.md §6.1, §6.4): what vLLM, transformers and
// LMDeploy load as an AWQ model. Per quantized linear `<name>` (HF W[out = N, in = K]):
//   <name>.qweight  int32 [K, N/8]    4-bit codes, transposed to [in, out], 8 output channels a word:
//                                     nibble i of word j = column 8j + kAwqOrder[i]
//   <name>.qzeros   int32 [K/g, N/8]  integer zero points, packed the same way
//   <name>.scales   fp16  [K/g, N]
//   <name>.bias     fp16  [N]         when the linear has one
// Everything else (embeddings, norms, LM head) as fp16; config.json gains quantization_config.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "file_io.h"
#include "int4.h"

namespace tmkit {

inline constexpr std::array<int, 8> kAwqOrder = {0, 2, 4, 6, 1, 3, 5, 7};

// codes [K, N] (0..15, row-major) <-> the AWQ-packed int32 [K, N/8]. N % 8 == 0.
std::vector<int32_t> awq_pack(const std::vector<uint8_t>& codes, int64_t K, int64_t N);
std::vector<uint8_t> awq_unpack(const std::vector<int32_t>& packed, int64_t K, int64_t N);

// The codes [K, N] of a TurboMind-layout int4 linear, and its zero points [K/g, N] as codes.
std::vector<uint8_t> int4_codes(const Int4Linear& q);
std::vector<uint8_t> int4_zero_codes(const Int4Linear& q);

struct HfAwqReport {
  int64_t linears = 0;
  std::vector<std::string> files;  // weight files written
  double seconds = 0;
};

// RTN-quantizes every decoder linear of an HF Llama / Mistral / Qwen2 checkpoint (the quantizer of
// rtn.h, in fp16 as the reference tools) and writes the AutoAWQ GEMM checkpoint to `dst`
// (atomically), shards of at most `max_shard_bytes`, tokenizer and generation files copied.
HfAwqReport write_hf_awq_rtn(const fs::path& src, const fs::path& dst, int64_t group, bool force,
                             uint64_t max_shard_bytes = 5'000'000'000ull);

}  // namespace tmkit
