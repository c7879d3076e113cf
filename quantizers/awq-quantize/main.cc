// awq-quantize: W4 quantization of a model. See README.md beside this file.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "awq_search.h"
#include "dataset.h"
#include "error.h"
#include "gpu_model.h"
#include "hf2tm.h"
#include "hf_config.h"
#include "hf_awq.h"
#include "perplexity.h"
#include "progress.h"
#include "rtn.h"
#include "tokenizer.h"
#include "turbomind.h"

namespace {

using tmkit::fs::path;

struct Options {
  path src, work_dir, calib_dataset;
  int w_bits = 4;
  int64_t group = 128, calib_samples = 128, calib_seqlen = 512, tp = 1;
  uint64_t seed = 0;
  std::string method = "awq", format = "hf-awq", sampling = "contiguous", device = "auto";
  tmkit::DatasetOptions dataset;
  tmkit::AwqOptions awq;
  bool no_search_scale = false, no_clip = false, skip_indivisible = false, force = false, json = false, quiet = false;
};

// Runs `write` into a temporary hf-awq sibling of the output, then hf2tm into the output.
void as_workspace(const Options& o, const std::function<void(const path&)>& write) {
  const path tmp = tmkit::unique_sibling(o.work_dir, "hf-awq");
  write(tmp);
  try {
    tmkit::Hf2TmOptions h;
    h.src = tmp;
    h.dst = o.work_dir;
    h.force = o.force;
    h.tp = o.tp;
    h.model_name = tmkit::model_name_of(o.src);  // not the temporary's
    tmkit::convert_hf_to_tm(h);
  } catch (...) {
    tmkit::fs::remove_all(tmp);
    throw;
  }
  tmkit::fs::remove_all(tmp);
}

// What an int4 TurboMind workspace of `tp` ranks cannot hold (every linear is int4, split into
// whole groups), checked before a search that may take long and named after the source (hf2tm
// itself would see only the temporary hf-awq checkpoint).
void check_turbomind_split(const path& src, int64_t tp, int64_t group) {
  const tmkit::HfConfig hf = tmkit::load_hf_config(src);
  const std::string where = (src / "config.json").string();
  if (hf.heads % tp || hf.kv_heads % tp)
    tmkit::fail("--tp {}: {} has {} attention heads and {} kv heads; both must divide by it", tp, where, hf.heads, hf.kv_heads);
  for (auto [in, ranks, name] : {std::tuple{hf.hidden, int64_t(1), "self_attn.q_proj"},
                                 {hf.heads * hf.head_dim, tp, "self_attn.o_proj"}, {hf.inter, tp, "mlp.down_proj"}}) {
    if (in % (ranks * group) == 0) continue;
    if (ranks > 1 && in % group == 0)
      tmkit::fail("--tp {}: {}: model.layers.*.{}.weight has {} input channels, {} per rank, not a multiple of the "
                  "group size {}", tp, where, name, in, double(in) / double(tp), group);
    tmkit::fail("{}: model.layers.*.{}.weight has {} input channels, not a multiple of the group size {}; an int4 "
                "TurboMind workspace holds no fp16 linears (--format hf-awq --skip-indivisible keeps them fp16)",
                where, name, in, group);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{
      "awq-quantize: 4-bit weight quantization (asymmetric, per group of input channels, the AWQ/RTN\n"
      "quantizer computed in fp16 as the reference tools do). --method awq runs llm-awq's activation-aware\n"
      "scale and clip search on calibration text first. Input: a Hugging Face model folder (or, for\n"
      "--method rtn --format turbomind, a TurboMind workspace). Written atomically: --work-dir appears\n"
      "only on success."};
  app.add_option("model", o.src, "HF model folder (config.json + safetensors) or TurboMind workspace")->required();
  app.add_option("--work-dir", o.work_dir, "output folder")->required();
  app.add_option("--w-bits", o.w_bits, "weight bits (4)")->check(CLI::IsMember({4}));
  app.add_option("--w-group-size,--group", o.group, "input channels per quantization group")->check(CLI::Range(8, 1 << 20));
  app.add_option("--method", o.method, "awq (activation-aware search, default) or rtn (round to nearest, no search)")
      ->check(CLI::IsMember({"awq", "rtn"}));
  app.add_option("--format", o.format, "hf-awq (AutoAWQ GEMM checkpoint, default) or turbomind (an int4 workspace)")
      ->check(CLI::IsMember({"hf-awq", "turbomind"}));
  app.add_option("--calib-dataset", o.calib_dataset, "calibration text: a file, a folder of .txt, .jsonl, or .i32 token ids");
  app.add_option("--calib-samples", o.calib_samples, "calibration blocks")->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--calib-seqlen", o.calib_seqlen, "tokens per calibration block")->check(CLI::Range(int64_t(2), int64_t(1) << 20));
  app.add_option("--calib-sampling", o.sampling, "contiguous (blocks in order) or random (windows; --seed)")
      ->check(CLI::IsMember({"contiguous", "random"}));
  app.add_option("--seed", o.seed, "seed of --calib-sampling random");
  app.add_option("--text-key", o.dataset.text_key, "the field holding the text in .jsonl calibration data");
  app.add_flag("--no-search-scale", o.no_search_scale, "skip the scale search (clip only)");
  app.add_flag("--no-clip", o.no_clip, "skip the clip search");
  app.add_flag("--duo-scaling", o.awq.duo_scaling, "AutoAWQ's variant: weight statistic in the scale candidates");
  app.add_flag("--skip-indivisible", o.skip_indivisible,
               "keep linears whose input channels do not split into groups in fp16 (listed in\n"
               "quantization_config.modules_to_not_convert) instead of failing; --format hf-awq only");
  app.add_option("--device", o.device, "where the AWQ search runs: cuda, cpu (Eigen; same rules, fp32) or auto (cuda when a GPU exists)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--tp", o.tp, "tensor-parallel ranks of the --format turbomind workspace")->check(CLI::Range(1, 64));
  app.add_flag("--force", o.force, "replace an existing --work-dir");
  app.add_flag("--json", o.json, "print a JSON report on stdout");
  app.add_flag("-q,--quiet", o.quiet, "no progress on stderr");
  CLI11_PARSE(app, argc, argv);

  tmkit::Progress progress("awq-quantize", "layers", !o.quiet);
  try {
    tmkit::install_interrupt_handler();
    const auto t0 = std::chrono::steady_clock::now();
    const bool workspace_input = tmkit::fs::exists(tmkit::weights_dir(o.src) / "config.yaml");
    nlohmann::json report = {{"source", o.src.string()}, {"work_dir", o.work_dir.string()}, {"method", o.method},
                             {"format", o.format},       {"w_bits", o.w_bits},              {"group_size", o.group}};
    if (o.format == "turbomind" && o.group != 128)  // before a search that may take long
      tmkit::fail("--w-group-size {}: TurboMind int4 workspaces take group 128 only", o.group);
    if (o.tp != 1 && o.format != "turbomind") tmkit::fail("--tp {}: only --format turbomind writes tensor-parallel ranks", o.tp);
    if (o.format == "turbomind" && !workspace_input) check_turbomind_split(o.src, o.tp, o.group);
    if (workspace_input && (o.method != "rtn" || o.format != "turbomind"))
      tmkit::fail("{}: a TurboMind workspace takes --method rtn --format turbomind only; give the HF model folder",
                  o.src.string());
    if (o.method == "rtn") {
      if (o.format == "hf-awq") {
        const auto w = tmkit::write_hf_awq(o.src, o.work_dir, o.group, o.force, nullptr, nullptr, o.skip_indivisible);
        report["linears"] = w.linears;
        report["not_converted"] = w.not_converted;
      } else if (workspace_input) {
        if (o.tp != 1) tmkit::fail("--tp {}: a workspace input keeps its ranks; give the HF model folder", o.tp);
        report["linears"] = tmkit::quantize_workspace_rtn(o.src, o.work_dir, o.group, o.force).linears;
      } else {
        as_workspace(o, [&](const path& tmp) { report["linears"] = tmkit::write_hf_awq(o.src, tmp, o.group, false).linears; });
      }
    } else {
      const bool cuda = o.device == "cuda" || (o.device == "auto" && tmkit::GpuModel::available());
      if (cuda) tmkit::gpu_start_context();  // overlaps the tokenization below
      if (o.calib_dataset.empty()) tmkit::fail("--method awq needs --calib-dataset (text or .i32 token ids)");
      if (tmkit::fs::exists(o.work_dir) && !o.force)  // before the search, not after it
        tmkit::fail("--work-dir {}: exists (use --force to replace it)", o.work_dir.string());
      tmkit::check_not_inside(o.work_dir, o.src, "--work-dir");
      tmkit::Sampling sampling{};
      tmkit::parse_sampling(o.sampling, &sampling);
      // Token ids (.i32) need no tokenizer (synthetic checkpoints have none); text goes through the model's.
      const auto ids = o.calib_dataset.extension() == ".i32"
                           ? tmkit::read_tokens(o.calib_dataset, tmkit::load_hf_config(o.src).vocab)
                           : tmkit::dataset_tokens(o.calib_dataset, *tmkit::load_tokenizer(o.src), o.dataset);
      const auto blocks = tmkit::sample_blocks(ids,
                                               {o.calib_samples, o.calib_seqlen, sampling, o.seed});
      o.awq.group = o.group;
      o.awq.search_scale = !o.no_search_scale;
      o.awq.clip = !o.no_clip;
      o.awq.skip_indivisible = o.skip_indivisible;
      const auto on_layer = [&](const tmkit::AwqLayerReport& l, int64_t n) {
        progress.update(l.layer + 1, n, double(l.layer + 1), double(n), fmt::format("layer {}", l.layer));
      };
      const tmkit::AwqResult r = cuda ? tmkit::awq_search_cuda(o.src, blocks, o.calib_samples, o.calib_seqlen, o.awq, on_layer)
                                      : tmkit::awq_search_cpu(o.src, blocks, o.calib_samples, o.calib_seqlen, o.awq, on_layer);
      progress.finish();
      nlohmann::json layers = nlohmann::json::array();
      for (const auto& l : r.layers) {
        layers.push_back({{"layer", l.layer}, {"ratio", l.ratio}, {"loss_ratio0", l.loss_ratio0}, {"loss", l.loss_best},
                          {"clip_mean_ratio", l.clip_mean_ratio}, {"seconds", l.seconds}});
        if (!l.phases.empty()) {
          nlohmann::json phases = nlohmann::json::object();
          for (const auto& [name, seconds] : l.phases) phases[name] = seconds;
          layers.back()["phases"] = phases;
        }
      }
      report["layers"] = layers;
      report["calibration"] = {{"dataset", o.calib_dataset.string()}, {"samples", o.calib_samples},
                               {"seqlen", o.calib_seqlen}, {"sampling", o.sampling}, {"seed", o.seed}};
      report["device"] = cuda ? "cuda" : "cpu";
      if (cuda) report["peak_device_bytes"] = r.peak_device_bytes;
      report["search_seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (o.format == "hf-awq") {
        const auto w = tmkit::write_hf_awq(o.src, o.work_dir, o.group, o.force, &r.tensors, &r.packed, o.skip_indivisible);
        report["linears"] = w.linears;
        report["not_converted"] = w.not_converted;
      } else {
        as_workspace(o, [&](const path& tmp) {
          report["linears"] = tmkit::write_hf_awq(o.src, tmp, o.group, false, &r.tensors, &r.packed).linears;
        });
      }
    }
    report["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (o.json) fmt::print("{}\n", report.dump(2));
    else if (!o.quiet)
      fmt::print(stderr, "awq-quantize: {} linears ({}, w{}g{}, {}) into {} in {:.2f} s\n", report["linears"].get<int64_t>(),
                 o.method, o.w_bits, o.group, o.format, o.work_dir.string(), report["seconds"].get<double>());
    return 0;
  } catch (const std::exception& e) {
    progress.finish();
    fmt::print(stderr, "awq-quantize: error: {}\n", tmkit::error_message(e));
    return 1;
  }
}
