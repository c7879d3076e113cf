// One output tensor file described as a gather from source tensors, then executed in bounded
// memory. Every TurboMind weight file is such a gather of HF rows:
//
//   source rows  : rows[k] = (tensor, row) of an HF tensor viewed as [rows, cols]
//                  (an HF linear is [out, in], so a row is one output feature; a 1-D tensor is
//                  [n, 1]); a null tensor stands for a row of zeros (vocab / inter padding).
//   columns      : [col_offset, col_offset + cols) of each source row; columns past the end of
//                  the source are zeros (padding of a split input dimension).
//   transpose    : false -> the file is [rows.size(), cols]   (embeddings, lm head, norms, biases)
//                  true  -> the file is [cols, rows.size()]   (linears, stored [in, out])
//
// q/k rotary permutation, the per-rank [q|k|v] merge, InternLM2's packed wqkv and every TP
// split are then nothing but choices of `rows` and of the column range.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "dtype.h"
#include "file_io.h"
#include "safetensors.h"

namespace tmkit {

struct RowRef {
  const TensorView* src = nullptr;  // nullptr: zeros
  int64_t row = 0;
};

struct FilePlan {
  std::string file;
  std::vector<RowRef> rows;
  int64_t col_offset = 0, cols = 0;
  bool transpose = false;
  std::vector<std::string> sources;  // HF tensor names, for messages and page release

  uint64_t numel() const { return uint64_t(rows.size()) * uint64_t(cols); }
};

struct WriteStats {
  uint64_t bytes = 0;
  uint64_t overflow = 0;  // finite values that became +-inf in fp16
};

// Writes the plan's bytes in `dst` type to `out`, converting element types on the way
// (round to nearest even). Source and destination must both be float types, or the same type.
// Working memory is bounded by `chunk_bytes` plus the source pages it touches.
WriteStats write_file_plan(const FilePlan& plan, DType dst, OutputFile& out, uint64_t chunk_bytes = 16ull << 20);

}  // namespace tmkit
