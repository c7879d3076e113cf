// kv-calibrate: KV-cache statistics and static scales of a model, written into a TurboMind
// workspace. See README.md beside this file.
#include <CLI/CLI.hpp>
#include <chrono>
#include <nlohmann/json.hpp>
#include <thread>

#include "dataset.h"
#include "error.h"
#include "gpu_model.h"
#include "hf2tm.h"
#include "kv_calibrate.h"
#include "perplexity.h"
#include "progress.h"
#include "tokenizer.h"

namespace {

using tmkit::fs::path;

struct Options {
  path src, dst, calib_dataset;
  int64_t samples = 128, seqlen = 2048, batch = 4, tp = 1;
  int kv_bits = 8, threads = int(std::max(1u, std::thread::hardware_concurrency()));
  uint64_t seed = 0;
  std::string sampling = "contiguous", device = "auto";
  tmkit::DatasetOptions dataset;
  bool force = false, json = false, quiet = false;
};

bool is_workspace(const path& p) { return tmkit::fs::exists(tmkit::weights_dir(p) / "config.yaml"); }

// A temporary folder removed when this goes out of scope.
struct TempDir {
  path p;
  ~TempDir() {
    std::error_code ec;
    if (!p.empty()) tmkit::fs::remove_all(p, ec);
  }
};

path convert(const path& hf, const path& near, int64_t tp, TempDir& keep) {
  keep.p = tmkit::unique_sibling(near, "kv-model");
  tmkit::Hf2TmOptions h;
  h.src = hf;
  h.dst = keep.p;
  h.tp = tp;
  h.model_name = tmkit::model_name_of(hf);
  tmkit::convert_hf_to_tm(h);
  return keep.p;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{
      "kv-calibrate: KV-cache calibration. Runs the model over calibration blocks and records, per layer,\n"
      "kv head and channel, min / max / absmax of K (after RoPE, and before it) and of V. Writes into the\n"
      "workspace: kv_stats.safetensors, static int8 and int4 scales per kv head and channel\n"
      "(layers.{i}.kv_int{8,4}.{r}.weight, used by `tm-eval --kv int8|int4 --kv-scales static`), the legacy\n"
      "lmdeploy <= 0.3 layers.{i}.past_kv_scale.{r}.weight files for --kv-bits, and a kv_calibration section\n"
      "in config.yaml. The model is a workspace (calibrated in place unless --dst-path names another) or a\n"
      "Hugging Face folder (then --dst-path is the workspace to calibrate, converted first if it does not\n"
      "exist). Written atomically: the workspace changes only when everything succeeded."};
  app.add_option("model", o.src, "TurboMind workspace or HF model folder")->required();
  app.add_option("--calib-dataset", o.calib_dataset, "calibration text: a file, a folder of .txt, .jsonl, or .i32 token ids")
      ->required();
  app.add_option("--calib-samples", o.samples, "calibration blocks")->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--calib-seqlen", o.seqlen, "tokens per calibration block")->check(CLI::Range(int64_t(2), int64_t(1) << 20));
  app.add_option("--calib-sampling", o.sampling, "contiguous (blocks in order) or random (windows; --seed)")
      ->check(CLI::IsMember({"contiguous", "random"}));
  app.add_option("--seed", o.seed, "seed of --calib-sampling random");
  app.add_option("--text-key", o.dataset.text_key, "the field holding the text in .jsonl calibration data");
  app.add_option("--dst-path", o.dst, "workspace to write (default: the model, when it is a workspace)");
  app.add_option("--kv-bits", o.kv_bits, "bits of the legacy past_kv_scale files (8 or 4); static scales are written for both")
      ->check(CLI::IsMember({8, 4}));
  app.add_option("--tp", o.tp, "tensor-parallel ranks of a workspace converted from an HF model")->check(CLI::Range(1, 64));
  app.add_option("--device", o.device, "cuda, cpu (the Eigen oracle) or auto (cuda when a GPU exists)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("-b,--batch", o.batch, "calibration blocks per GPU forward")->check(CLI::Range(int64_t(1), int64_t(4096)));
  app.add_option("-t,--threads", o.threads, "CPU threads (blocks in parallel on the CPU)")->check(CLI::Range(1, 1024));
  app.add_flag("--force", o.force, "replace an existing --dst-path that is not the model itself");
  app.add_flag("--json", o.json, "print a JSON report on stdout");
  app.add_flag("-q,--quiet", o.quiet, "no progress on stderr");
  CLI11_PARSE(app, argc, argv);

  tmkit::Progress progress("kv-calibrate", "blocks", !o.quiet);
  try {
    tmkit::install_interrupt_handler();
    const auto t0 = std::chrono::steady_clock::now();
    const bool src_ws = is_workspace(o.src);
    if (!src_ws && !tmkit::fs::exists(o.src / "config.json"))
      tmkit::fail("{}: neither a TurboMind workspace nor an HF model folder (no config.json)", o.src.string());
    if (o.dst.empty()) {
      if (!src_ws) tmkit::fail("--dst-path: required when the model is an HF folder");
      o.dst = o.src;
    }
    if (src_ws && o.tp != 1) tmkit::fail("--tp {}: a workspace keeps its ranks (tm-shard re-splits it)", o.tp);
    const bool dst_ws = is_workspace(o.dst);
    const bool in_place = src_ws && tmkit::fs::exists(o.dst) && tmkit::fs::equivalent(o.dst, o.src);
    if (src_ws && !in_place) {
      if (tmkit::fs::exists(o.dst) && !o.force) tmkit::fail("--dst-path {}: exists (use --force to replace it)", o.dst.string());
      tmkit::check_not_inside(o.dst, o.src, "--dst-path");
    }
    if (!src_ws && tmkit::fs::exists(o.dst) && !dst_ws && !o.force)
      tmkit::fail("--dst-path {}: exists and is not a workspace (use --force to replace it)", o.dst.string());
    const bool cuda = o.device == "cuda" || (o.device == "auto" && tmkit::GpuModel::available());
    if (cuda) tmkit::gpu_start_context();

    // The model that runs: the workspace, or the HF model converted (tp 1) beside the output.
    TempDir run_tmp, out_tmp;
    const path run_ws = src_ws ? o.src : convert(o.src, o.dst, 1, run_tmp);
    // What the output is made from: the source workspace, the destination workspace, or a fresh
    // conversion of the HF model at --tp.
    const path base = src_ws ? o.src : dst_ws && !o.force ? o.dst : o.tp == 1 ? run_ws : convert(o.src, o.dst, o.tp, out_tmp);
    tmkit::TmConfig cfg = tmkit::load_tm_config(base);
    const tmkit::TmConfig run_cfg = tmkit::load_tm_config(run_ws);
    if (run_cfg.num_layer != cfg.num_layer || run_cfg.kv_head_num != cfg.kv_head_num || run_cfg.size_per_head != cfg.size_per_head)
      tmkit::fail("--dst-path {}: {} layers x {} kv heads x {} channels, the model has {} x {} x {}", o.dst.string(),
                  cfg.num_layer, cfg.kv_head_num, cfg.size_per_head, run_cfg.num_layer, run_cfg.kv_head_num, run_cfg.size_per_head);

    tmkit::Sampling sampling{};
    tmkit::parse_sampling(o.sampling, &sampling);
    const auto ids = o.calib_dataset.extension() == ".i32"
                         ? tmkit::read_tokens(o.calib_dataset, run_cfg.vocab_size)
                         : tmkit::dataset_tokens(o.calib_dataset, *tmkit::load_tokenizer(o.src), o.dataset);
    const auto blocks = tmkit::sample_blocks(ids, {o.samples, o.seqlen, sampling, o.seed});
    const auto on_block = [&](int64_t done, int64_t total) {
      progress.update(done, total, double(done), double(total), fmt::format("block {}", done));
    };
    tmkit::ModelWeights w = tmkit::load_workspace(run_ws);
    const auto on_cpu = [&] {
      const tmkit::CpuModel model(std::move(w));
      tmkit::check_host_memory(model, o.seqlen, std::min<int64_t>(o.threads, o.samples), "--calib-seqlen");
      return tmkit::kv_stats_cpu(model, blocks, o.samples, o.seqlen, o.threads, on_block);
    };
    const tmkit::KvStats stats = cuda ? tmkit::kv_stats_gpu(w, blocks, o.samples, o.seqlen, o.batch, on_block) : on_cpu();
    progress.finish();

    tmkit::AtomicOutputDir out(o.dst, true);
    const auto kv_files = tmkit::kv_calibration_files(cfg);
    tmkit::mirror_tree(base, out.tmp(), [&](const path& rel) {
      const bool weights = rel.parent_path() == path("triton_models") / "weights";
      const std::string name = rel.filename().string();
      // Every old calibration file goes (whatever tp wrote it): the new calibration replaces them all.
      return weights && (name == "config.yaml" || name == tmkit::kKvStatsFile ||
                         name.find(".past_kv_scale.") != std::string::npos || name.find(".kv_int") != std::string::npos);
    });
    tmkit::KvCalibrationFiles files;
    files.legacy_bits = o.kv_bits;
    files.samples = o.samples;
    files.seqlen = o.seqlen;
    files.dataset = o.calib_dataset.filename().string();
    cfg = tmkit::write_kv_calibration(tmkit::weights_dir(out.tmp()), cfg, stats, files);
    tmkit::write_file(tmkit::weights_dir(out.tmp()) / "config.yaml", tmkit::format_config_yaml(cfg));
    out.commit();

    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (o.json) {
      nlohmann::json layers = nlohmann::json::array();
      for (const auto& l : stats.layers) {
        auto peak = [&](tmkit::KvStats::Tensor t) {
          const auto& v = l.at(t, tmkit::KvStats::kAbsmax);
          return *std::max_element(v.begin(), v.end());
        };
        layers.push_back({{"k_absmax", peak(tmkit::KvStats::kK)}, {"k_prerope_absmax", peak(tmkit::KvStats::kKPreRope)},
                          {"v_absmax", peak(tmkit::KvStats::kV)}});
      }
      nlohmann::json j = {{"model", o.src.string()}, {"dst_path", o.dst.string()}, {"device", cuda ? "cuda" : "cpu"},
                          {"calibration", {{"dataset", o.calib_dataset.string()}, {"samples", o.samples},
                                           {"seqlen", o.seqlen}, {"sampling", o.sampling}, {"seed", o.seed}}},
                          {"tokens", stats.tokens}, {"kv_bits", o.kv_bits}, {"tp", cfg.tp}, {"files", kv_files},
                          {"layers", layers}, {"seconds", seconds}};
      fmt::print("{}\n", j.dump(2));
    } else if (!o.quiet) {
      fmt::print(stderr, "kv-calibrate: {} tokens, {} layers into {} ({} files) in {:.2f} s\n", stats.tokens,
                 stats.layers.size(), o.dst.string(), kv_files.size() + 1, seconds);
    }
    return 0;
  } catch (const std::exception& e) {
    progress.finish();
    fmt::print(stderr, "kv-calibrate: error: {}\n", tmkit::error_message(e));
    return 1;
  }
}
