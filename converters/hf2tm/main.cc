// hf2tm: Hugging Face checkpoint -> TurboMind workspace. See README.md beside this file.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "error.h"
#include "hf2tm.h"
#include "progress.h"

int main(int argc, char** argv) {
  tmkit::Hf2TmOptions opt;
  bool json = false, quiet = false;
  CLI::App app{
      "hf2tm: convert a Hugging Face checkpoint (safetensors; fp32/fp16/bf16) into a TurboMind workspace\n"
      "(lmdeploy v0.6.4 layout), optionally split for tensor parallelism. Streams tensor by tensor and\n"
      "writes atomically: the workspace appears at --dst-path only when the conversion succeeded."};
  app.add_option("hf-model-dir", opt.src, "HF model folder (config.json + safetensors)")->required();
  app.add_option("--dst-path", opt.dst, "workspace folder to create")->required();
  app.add_option("--tp", opt.tp, "tensor-parallel size to split for")->check(CLI::Range(1, 1024));
  app.add_option("--dtype", opt.dtype,
                 "weight type: auto (bf16 stays bf16, fp32/fp16 become fp16), float16 or bfloat16")
      ->check(CLI::IsMember({"auto", "float16", "bfloat16"}));
  app.add_flag("--force", opt.force, "replace an existing --dst-path");
  app.add_flag("--allow-overflow", opt.allow_overflow, "write values outside the fp16 range as inf instead of failing");
  app.add_flag("--json", json, "print a JSON report on stdout");
  app.add_flag("-q,--quiet", quiet, "no progress on stderr");
  CLI11_PARSE(app, argc, argv);

  tmkit::Progress progress("hf2tm", "B", !quiet);
  try {
    tmkit::install_interrupt_handler();
    auto rep = tmkit::convert_hf_to_tm(opt, [&](int64_t i, int64_t n, uint64_t done, uint64_t total, const std::string& f) {
      progress.update(i, n, double(done), double(total), f);
    });
    progress.finish();
    if (json) {
      nlohmann::json j = {{"source", opt.src.string()}, {"dst_path", opt.dst.string()}, {"tensors", rep.tensors},
                          {"bytes", rep.bytes}, {"seconds", rep.seconds}, {"dtype", rep.weight_type},
                          {"tp", rep.tp}, {"overflow_values", rep.overflow_values}, {"files", rep.files}};
      fmt::print("{}\n", j.dump(2));
    } else if (!quiet) {
      fmt::print(stderr, "hf2tm: wrote {} tensor files ({:.1f} MB, {}, tp {}) to {} in {:.2f} s\n", rep.tensors,
                 rep.bytes / 1e6, rep.weight_type, rep.tp, opt.dst.string(), rep.seconds);
    }
    return 0;
  } catch (const std::exception& e) {
    progress.finish();
    fmt::print(stderr, "hf2tm: error: {}\n", tmkit::error_message(e));
    return 1;
  }
}
