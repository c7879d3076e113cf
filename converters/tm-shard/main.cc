// tm-shard: re-split a TurboMind workspace for another tensor-parallel size. See README.md beside this file.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "error.h"
#include "progress.h"
#include "tm_shard.h"

int main(int argc, char** argv) {
  tmkit::TmShardOptions opt;
  bool json = false, quiet = false;
  CLI::App app{
      "tm-shard: re-split a TurboMind workspace (as hf2tm writes it; fp16, bf16 or int4) for another\n"
      "tensor-parallel size: 1 <-> 2 <-> 4, or any tp dividing the heads, kv heads and hidden size. The\n"
      "result equals `hf2tm --tp N` of the same model byte for byte (vocab and inter_size padding follow\n"
      "the new tp); past_kv_scale files are re-split too. Streams one tensor at a time and writes\n"
      "atomically: the workspace appears at --dst-path only when everything succeeded."};
  app.add_option("workspace", opt.src, "source workspace folder (holds triton_models/weights/config.yaml)")->required();
  app.add_option("--tp", opt.tp, "tensor-parallel size to split for")->required()->check(CLI::Range(1, 1024));
  app.add_option("--dst-path", opt.dst, "workspace folder to create (not inside the source)")->required();
  app.add_flag("--force", opt.force, "replace an existing --dst-path");
  app.add_option("--kv-bits", opt.kv_bits,
                 "bits the past_kv_scale files were calibrated for; used only when ranks with different "
                 "scales merge (default 8)")
      ->check(CLI::IsMember({4, 8}));
  app.add_flag("--json", json, "print a JSON report on stdout");
  app.add_flag("-q,--quiet", quiet, "no progress on stderr");
  CLI11_PARSE(app, argc, argv);

  tmkit::Progress progress("tm-shard", "B", !quiet);
  try {
    tmkit::install_interrupt_handler();
    auto rep = tmkit::reshard_workspace(opt, [&](int64_t i, int64_t n, uint64_t done, uint64_t total, const std::string& f) {
      progress.update(i, n, double(done), double(total), f);
    });
    progress.finish();
    if (json) {
      nlohmann::json j = {{"source", opt.src.string()}, {"dst_path", opt.dst.string()}, {"tp_from", rep.tp_from},
                          {"tp", rep.tp}, {"dtype", rep.weight_type}, {"inter_size", rep.inter_size},
                          {"tensors", rep.tensors}, {"bytes", rep.bytes}, {"kv_scales", rep.kv_scales},
                          {"seconds", rep.seconds}, {"files", rep.files}};
      fmt::print("{}\n", j.dump(2));
    } else if (!quiet) {
      fmt::print(stderr, "tm-shard: wrote {} tensor files ({:.1f} MB, {}, tp {} -> {}) to {} in {:.2f} s\n", rep.tensors,
                 rep.bytes / 1e6, rep.weight_type, rep.tp_from, rep.tp, opt.dst.string(), rep.seconds);
    }
    return 0;
  } catch (const std::exception& e) {
    progress.finish();
    fmt::print(stderr, "tm-shard: error: {}\n", tmkit::error_message(e));
    return 1;
  }
}
