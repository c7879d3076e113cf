// What release-model writes about a finished pipeline: report.json (every measured number, with
// what produced it), the figure (plots.svg) and README.md, the model card a person reads. The
// card and the figure derive from the report alone, so they always agree with it.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "manifest.h"

namespace tmkit {

// A finished step as the pipeline recorded it.
struct StepRecord {
  std::string name, command;
  nlohmann::json result;  // the tool's --json report
  double seconds = 0;
  std::string output;     // the folder it made, relative to the repository ("": an evaluation)
  std::string kind;       // "artifact", "ppl" or "bench"
  std::string artifact, kv, kv_scales;  // what a ppl / bench step measured
  FileTable files;        // the output's files
};

struct ReleaseFacts {
  nlohmann::json options;  // the pipeline's options (pipeline.cc's options_json)
  std::string version, model_name, calib_sha256, eval_sha256;
  std::vector<StepRecord> steps;
  std::vector<std::string> artifact_dirs;  // kept in the repository, in step order
  std::string base_dir;                    // the unquantized workspace the quality is measured against
  std::string speed_note;                  // why there is no speed ("" when measured)
};

// report.json's content; `root` holds the repository's folders (their config.yaml is read).
nlohmann::json release_report(const ReleaseFacts& f, const fs::path& root, bool timings);
std::string release_plot(const nlohmann::json& report);
std::string model_card(const nlohmann::json& report);

}  // namespace tmkit
