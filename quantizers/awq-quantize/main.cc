// awq-quantize: W4 quantization of a model. See README.md beside this file. This version carries
// the no-search baseline (--method rtn) into both outputs; the AWQ search follows (issue 5).
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "error.h"
#include "hf2tm.h"
#include "hf_awq.h"
#include "rtn.h"
#include "turbomind.h"

int main(int argc, char** argv) {
  tmkit::fs::path src, work_dir;
  int w_bits = 4;
  int64_t group = 128;
  std::string method = "awq", format = "hf-awq";
  bool force = false, json = false;
  CLI::App app{
      "awq-quantize: 4-bit weight quantization (asymmetric, per group of input channels, the AWQ/RTN\n"
      "quantizer computed in fp16 as the reference tools do). Input: a Hugging Face model folder or a\n"
      "TurboMind workspace (fp16/bf16). Written atomically: --work-dir appears only on success."};
  app.add_option("model", src, "HF model folder (config.json + safetensors) or TurboMind workspace")->required();
  app.add_option("--work-dir", work_dir, "output folder")->required();
  app.add_option("--w-bits", w_bits, "weight bits (4)")->check(CLI::IsMember({4}));
  app.add_option("--w-group-size,--group", group, "input channels per quantization group")->check(CLI::Range(8, 1 << 20));
  app.add_option("--method", method, "awq (activation-aware search) or rtn (round to nearest, no search)")
      ->check(CLI::IsMember({"awq", "rtn"}));
  app.add_option("--format", format, "hf-awq (AutoAWQ GEMM checkpoint) or turbomind (an int4 workspace)")
      ->check(CLI::IsMember({"hf-awq", "turbomind"}));
  app.add_flag("--force", force, "replace an existing --work-dir");
  app.add_flag("--json", json, "print a JSON report on stdout");
  CLI11_PARSE(app, argc, argv);

  try {
    tmkit::install_interrupt_handler();
    if (method != "rtn") tmkit::fail("--method awq: the AWQ search is not in this build yet; --method rtn is");
    const bool workspace_input = tmkit::fs::exists(tmkit::weights_dir(src) / "config.yaml");
    int64_t linears = 0;
    double seconds = 0;
    if (format == "hf-awq") {
      if (workspace_input) tmkit::fail("{}: --format hf-awq needs a Hugging Face model folder as input", src.string());
      const auto rep = tmkit::write_hf_awq_rtn(src, work_dir, group, force);
      linears = rep.linears;
      seconds = rep.seconds;
    } else {
      tmkit::fs::path ws = src, converted;
      if (!workspace_input) {  // an HF folder: convert it next to the output first
        converted = work_dir;
        converted += ".fp16-workspace.tmp";
        tmkit::Hf2TmOptions o;
        o.src = src;
        o.dst = converted;
        o.force = true;
        tmkit::convert_hf_to_tm(o);
        ws = converted;
      }
      tmkit::RtnReport rep;
      try {
        rep = tmkit::quantize_workspace_rtn(ws, work_dir, group, force);
      } catch (...) {
        if (!converted.empty()) tmkit::fs::remove_all(converted);
        throw;
      }
      if (!converted.empty()) tmkit::fs::remove_all(converted);
      linears = rep.linears;
      seconds = rep.seconds;
    }
    if (json) {
      nlohmann::json j = {{"source", src.string()}, {"work_dir", work_dir.string()}, {"method", method},
                          {"format", format},       {"w_bits", w_bits},              {"group_size", group},
                          {"linears", linears},     {"seconds", seconds}};
      fmt::print("{}\n", j.dump(2));
    } else {
      fmt::print(stderr, "awq-quantize: {} linears quantized (rtn, w{}g{}, {}) into {} in {:.2f} s\n", linears, w_bits,
                 group, format, work_dir.string(), seconds);
    }
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "awq-quantize: error: {}\n", e.what());
    return 1;
  }
}
