// release-model: HF checkpoint -> AWQ -> TurboMind workspaces -> verified model repository.
// See README.md beside this file.
#include <CLI/CLI.hpp>
#include <set>
#include <sstream>

#include "error.h"
#include "pipeline.h"

namespace {

std::vector<int64_t> parse_tps(const std::string& s) {
  std::vector<int64_t> out;
  std::set<int64_t> seen;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, ',');) {
    size_t used = 0;
    int64_t tp = 0;
    try {
      tp = std::stoll(part, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != part.size() || part.empty() || tp < 1 || tp > 1024) tmkit::fail("--tp: '{}' is not a size in 1..1024", part);
    if (!seen.insert(tp).second) tmkit::fail("--tp: {} given twice", tp);
    out.push_back(tp);
  }
  if (out.empty()) tmkit::fail("--tp: no size");
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  tmkit::ReleaseOptions o;
  std::string model, out, tps = "1", bin_dir;
  bool no_quant = false, no_timings = false;
  CLI::App app{
      "release-model: one reproducible pipeline from a Hugging Face checkpoint to a checkable model repository.\n"
      "Runs awq-quantize, hf2tm, kv-calibrate, tm-shard (each further --tp) and tm-eval (perplexity of the base and\n"
      "of every artifact; speed where a GPU exists), then writes README.md (the model card, with plots.svg),\n"
      "report.json and manifest.json (every file's size and sha256, and the commands). Builds in <out>.partial and\n"
      "renames it to --out only when everything succeeded; a failed step exits non-zero naming it, and --resume\n"
      "continues from the first step whose outputs do not verify."};
  app.add_option("model", model, "Hugging Face model folder (config.json + safetensors)")->required();
  app.add_option("--out", out, "the repository folder to create")->required();
  app.add_option("--w-bits", o.w_bits, "weight bits (4)")->check(CLI::IsMember({4}));
  app.add_option("--w-group-size,--group", o.group, "input channels per quantization group")->check(CLI::Range(8, 1 << 20));
  app.add_flag("--no-quant", no_quant, "keep the weights in 16 bits (no AWQ step)");
  app.add_option("--tp", tps, "tensor-parallel sizes, comma-separated, one workspace each: the first converted, the others "
                              "re-split from it with tm-shard");
  app.add_flag("--kv-calibrate", o.kv_calibrate, "calibrate static KV-cache scales (kv-calibrate) and evaluate them too");
  app.add_option("--calib-dataset", o.calib_dataset, "calibration text (a file, a folder of .txt, .jsonl, or .i32 token ids)");
  app.add_option("--calib-samples", o.calib_samples, "calibration blocks (AWQ and KV)")->check(CLI::Range(1, 1 << 20));
  app.add_option("--calib-seqlen", o.calib_seqlen, "tokens per calibration block")->check(CLI::Range(2, 1 << 20));
  app.add_option("--eval-dataset", o.eval_dataset, "evaluation text (a file, a folder of .txt, .jsonl, or .i32 token ids)")
      ->required();
  app.add_option("--eval-ctx", o.eval_ctx, "perplexity chunk length (tm-eval ppl -c)")->check(CLI::Range(2, 1 << 20));
  app.add_option("--eval-chunks", o.eval_chunks, "chunks to score (0: all)")->check(CLI::Range(0, 1 << 30));
  app.add_option("--bench-prompt", o.bench_prompt, "pp test length (tm-eval bench -p)")->check(CLI::Range(0, 1 << 20));
  app.add_option("--bench-gen", o.bench_gen, "tg test length (tm-eval bench -n)")->check(CLI::Range(0, 1 << 20));
  app.add_option("--bench-reps", o.bench_reps, "bench repetitions (tm-eval bench -r)")->check(CLI::Range(1, 1000));
  app.add_option("--device", o.device, "where the AWQ search, KV calibration and evaluation run: auto (cuda when a GPU "
                                       "exists), cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_flag("--no-timings", no_timings,
               "measure no speed and record no durations: two runs then give byte-identical repositories but for "
               "report.json's generated_at");
  app.add_flag("--resume", o.resume, "continue an interrupted run from <out>.partial (or check a finished --out)");
  app.add_flag("--force", o.force, "replace an existing --out (only once the new one is complete) or a stale <out>.partial");
  app.add_option("--bin-dir", bin_dir, "where tmkit's tools are (default: beside release-model)");
  app.add_flag("-q,--quiet", o.quiet, "no progress on stderr");
  CLI11_PARSE(app, argc, argv);
  try {
    o.quantize = !no_quant;
    o.timings = !no_timings;
    o.tps = parse_tps(tps);
    // The steps run inside the repository: inputs are made absolute first.
    o.model = tmkit::fs::absolute(model).lexically_normal();
    o.out = tmkit::fs::absolute(out).lexically_normal();
    if (!o.out.has_filename()) o.out = o.out.parent_path();
    if (!o.calib_dataset.empty()) o.calib_dataset = tmkit::fs::absolute(o.calib_dataset).lexically_normal().string();
    o.eval_dataset = tmkit::fs::absolute(o.eval_dataset).lexically_normal().string();
    if (!bin_dir.empty()) o.bin_dir = tmkit::fs::absolute(bin_dir);
    tmkit::run_release(o);
  } catch (const std::exception& e) {
    fmt::print(stderr, "release-model: error: {}\n", tmkit::error_message(e));
    return 1;
  }
  return 0;
}
