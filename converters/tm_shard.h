// TurboMind workspace -> the same workspace split for another tensor-parallel size, streamed
// tensor by tensor (lmdeploy v0.6.4 layout, ../shared/specs/turbomind-format.md §5, §6.2, §7.1).
//
// Every rank file is a slice of one logical, unsplit tensor, so re-sharding is a copy: the
// destination rank's slice is gathered from whichever source ranks hold it. The slices are
// exactly hf2tm's (converters/hf2tm.cc): per-rank [q_r|k_r|v_r] for w_qkv (weights, biases, int4
// qweight/scales/zeros alike), wo and w2 by input rows, w1 and w3 by output columns, embeddings
// by hidden columns, the LM head by vocab rows; norms and the wo bias are not split. Padding
// follows the destination tp as hf2tm pads: vocab rows to a multiple of tp, inter_size by
// lmdeploy's formula. Output equals `hf2tm --tp N` of the same model byte for byte.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "file_io.h"

namespace tmkit {

struct TmShardOptions {
  fs::path src, dst;
  int64_t tp = 0;  // destination tensor-parallel size
  bool force = false;
  // Bits the past_kv_scale files were calibrated for (scale = (max - min) / (2^bits - 1)); only
  // used when ranks with different scales merge into one.
  int kv_bits = 8;
};

struct TmShardReport {
  int64_t tp_from = 1, tp = 1;
  std::string weight_type;
  std::vector<int64_t> inter_size;  // per layer, padded for the destination tp
  int64_t tensors = 0;              // tensor files written
  uint64_t bytes = 0;               // bytes of tensor files
  bool kv_scales = false;           // past_kv_scale files were re-split
  double seconds = 0;
  std::vector<std::string> files;   // relative to the workspace root, in writing order
};

// Called after each tensor file: (files done, files total, bytes done, bytes total, file name).
using TmShardProgress = std::function<void(int64_t, int64_t, uint64_t, uint64_t, const std::string&)>;

// Writes `opt.src` re-split for `opt.tp` to `opt.dst` atomically. Throws a tmkit::Error naming
// the file, tensor or flag at fault (impossible split, missing or mis-sized file, unknown file,
// existing destination without force, destination inside the source) and leaves nothing behind.
TmShardReport reshard_workspace(const TmShardOptions& opt, const TmShardProgress& progress = {});

}  // namespace tmkit
