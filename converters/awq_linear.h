// hf2tm's reading of AutoAWQ "GEMM" linears (../shared/specs/awq.md §6.1) and its writing of
// TurboMind v0.6 int4 files (spec turbomind-format.md §6.2): unpack the AWQ nibble order into
// codes, gather the columns and rows one rank file needs (the q/k rotary permutation, the q|k|v
// merge, TP splits, inter padding with zeros as lmdeploy pads), and pack sequentially.
#pragma once
#include <string>
#include <vector>

#include "int4.h"
#include "safetensors.h"

namespace tmkit {

// One AWQ linear `<base>qweight / qzeros / scales`, unpacked, in workspace orientation [K = in, N = out].
struct AwqLinear {
  int64_t K = 0, N = 0, group = 0;
  std::vector<uint8_t> codes;    // [K, N]
  std::vector<uint8_t> zeros;    // [K/group, N]
  std::vector<uint16_t> scales;  // [K/group, N], fp16 bits
};

// Reads and checks (dtypes, shapes against K and N, group) one linear; errors name the tensor.
AwqLinear read_awq_linear(const Checkpoint& ckpt, const std::string& base, int64_t K, int64_t N, int64_t group);

// The int4 linear of rows [row0, row0 + rows) and the given columns of `sources`: column c of the
// result is sources[cols[c].first] column cols[c].second, or zeros (code, zero point and scale 0)
// when cols[c].first < 0 or the row is past the source's K. row0 and rows are multiples of group.
Int4Linear gather_int4(const std::vector<const AwqLinear*>& sources, const std::vector<std::pair<int, int64_t>>& cols,
                       int64_t row0, int64_t rows, int64_t group);

}  // namespace tmkit
