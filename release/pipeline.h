// release-model: one reproducible pipeline from a Hugging Face checkpoint to a checkable model
// repository. It runs tmkit's own executables in order (awq-quantize, hf2tm, kv-calibrate,
// tm-shard for each tp, tm-eval on the base and on every artifact), each into a folder of
// `<out>.partial`, records every finished step (its command, its files' sizes and sha256, its
// result) in `<out>.partial/.release-state.json`, and when all succeeded writes report.json,
// README.md, plots.svg and manifest.json and renames `<out>.partial` to `<out>`.
//
// A failed step removes its own output and the run exits naming the step; `--resume` runs the
// pipeline again over the kept `<out>.partial`, skipping each step whose recorded files still
// verify (and every step before the first that does not).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "file_io.h"

namespace tmkit {

struct ReleaseOptions {
  fs::path model, out;
  bool quantize = true;  // false: --no-quant (fp16/bf16 workspaces)
  int w_bits = 4;
  int64_t group = 128;
  std::vector<int64_t> tps = {1};
  bool kv_calibrate = false;
  std::string calib_dataset, eval_dataset;
  int64_t calib_samples = 128, calib_seqlen = 2048;
  int64_t eval_ctx = 512, eval_chunks = 0;  // 0: every chunk
  int64_t bench_prompt = 512, bench_gen = 128, bench_reps = 3;
  std::string device = "auto";  // auto, cpu or cuda: where the search, calibration and evaluation run
  bool timings = true;           // false (--no-timings): no speed, no durations; the repo is reproducible
  bool resume = false, force = false, quiet = false;
  fs::path bin_dir;              // where the tools are (default: beside release-model)
};

// Runs the pipeline; throws tmkit::Error naming the step that failed.
void run_release(const ReleaseOptions& opt);

// tmkit's version as the manifest records it (the CMake project's).
std::string tmkit_version();

}  // namespace tmkit
