// HF checkpoint -> TurboMind workspace (lmdeploy v0.6.4 layout), streamed tensor by tensor.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "file_io.h"

namespace tmkit {

struct Hf2TmOptions {
  fs::path src, dst;
  int64_t tp = 1;
  std::string dtype = "auto";  // auto | float16 | bfloat16
  bool force = false;
  bool allow_overflow = false;
  std::string model_name;  // config.yaml's model_name; empty: the source folder's name
};

struct Hf2TmReport {
  int64_t tensors = 0;  // tensor files written
  uint64_t bytes = 0;   // bytes of tensor files
  double seconds = 0;
  std::string weight_type;
  int64_t tp = 1;
  uint64_t overflow_values = 0;
  std::vector<std::string> files;  // relative to the workspace root, in writing order
};

// Called after each tensor file: (files done, files total, bytes done, bytes total, file name).
using Hf2TmProgress = std::function<void(int64_t, int64_t, uint64_t, uint64_t, const std::string&)>;

// A model's name as config.yaml records it: the name of its folder.
std::string model_name_of(const fs::path& model_dir);

Hf2TmReport convert_hf_to_tm(const Hf2TmOptions& opt, const Hf2TmProgress& progress = {});

}  // namespace tmkit
