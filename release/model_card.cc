#include "model_card.h"

#include <ctime>
#include <set>

#include "error.h"
#include "kv_stats.h"
#include "safetensors.h"
#include "svg_plot.h"
#include "turbomind.h"

namespace tmkit {

using nlohmann::json;

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

// Weight bytes of the artifact in `dir` (relative to `root`): a workspace's weight files but its
// config.yaml and KV calibration files; a checkpoint's safetensors.
uint64_t weight_bytes(const FileTable& files, const fs::path& root, const std::string& dir) {
  const fs::path weights = weights_dir(root / dir);
  const bool workspace = fs::exists(weights / "config.yaml");
  std::set<std::string> skip = {fs::relative(weights / "config.yaml", root).generic_string()};
  if (workspace)
    for (const std::string& name : kv_calibration_files(load_tm_config(root / dir)))
      skip.insert(fs::relative(weights / name, root).generic_string());
  const std::string prefix = (workspace ? fs::relative(weights, root).generic_string() : dir) + "/";
  uint64_t n = 0;
  for (const auto& [rel, e] : files)
    if (starts_with(rel, prefix) && !skip.count(rel) && (workspace || rel.ends_with(".safetensors"))) n += e.size;
  return n;
}

uint64_t total_bytes(const FileTable& files, const std::string& dir) {
  uint64_t n = 0;
  for (const auto& [rel, e] : files)
    if (starts_with(rel, dir + "/")) n += e.size;
  return n;
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string size_text(double bytes) {
  if (bytes >= 1e9) return fmt::format("{:.2f} GB", bytes / 1e9);
  if (bytes >= 1e6) return fmt::format("{:.1f} MB", bytes / 1e6);
  return fmt::format("{:.1f} kB", bytes / 1e3);
}

int64_t checkpoint_parameters(const fs::path& dir) {
  const Checkpoint ck(dir);
  int64_t n = 0;
  for (const std::string& name : ck.names()) n += ck.get(name).info->numel();
  return n;
}

}  // namespace

json release_report(const ReleaseFacts& f, const fs::path& root, bool timings) {
  const json& o = f.options;
  FileTable all;
  for (const StepRecord& s : f.steps) all.insert(s.files.begin(), s.files.end());
  // Bits per weight: 8 x weight bytes / parameters. A checkpoint's parameters are the source's; a
  // workspace's are the unquantized workspace's 16-bit elements, since a workspace stores some
  // tensors twice (tied embeddings as both embedding and LM head).
  const int64_t params = checkpoint_parameters(o["model"].get<std::string>());
  const uint64_t base_bytes = weight_bytes(all, root, f.base_dir);
  if (!base_bytes || params <= 0) fail("release report: the base workspace {} has no weight files", f.base_dir);

  json r = {{"format", "tmkit release report"}, {"version", 1}, {"generated_at", utc_now()},
            {"tmkit_version", f.version}, {"model", {{"name", f.model_name}, {"source", o["model"]}}}};
  const json calib = {{"dataset", o["calib_dataset"]}, {"sha256", f.calib_sha256}, {"samples", o["calib_samples"]},
                      {"seqlen", o["calib_seqlen"]}};
  r["quantization"] = o["quantize"].get<bool>()
                          ? json{{"method", "awq"}, {"w_bits", o["w_bits"]}, {"group_size", o["group"]}, {"calibration", calib}}
                          : json(nullptr);
  r["kv_calibration"] = o["kv_calibrate"].get<bool>() ? calib : json(nullptr);

  const TmConfig base_cfg = load_tm_config(root / f.base_dir);
  r["model"]["architecture"] = base_cfg.model_arch;
  r["model"]["parameters"] = params;
  json artifacts = json::array();
  auto artifact = [&](const std::string& name, const std::string& dir, bool kept) {
    json a = {{"name", name}, {"path", kept ? json(dir) : json(nullptr)}, {"bytes", total_bytes(all, dir)}};
    const double elements = dir == "hf-awq" ? double(params) : double(base_bytes) / 2;
    a["bits_per_weight"] = 8.0 * double(weight_bytes(all, root, dir)) / elements;
    if (dir == "hf-awq") {
      a["kind"] = "hf-awq";
      a["weights"] = fmt::format("int{} g{} (AWQ)", o["w_bits"].get<int>(), o["group"].get<int64_t>());
    } else {
      const TmConfig c = load_tm_config(root / dir);
      a["kind"] = "turbomind";
      a["tp"] = c.tp;
      a["weights"] = c.weight_type == "int4" ? fmt::format("int4 g{} (AWQ)", c.group_size) : c.weight_type;
      a["kv_calibrated"] = c.kv_calib_bits != 0;
    }
    artifacts.push_back(a);
  };
  if (o["quantize"].get<bool>()) artifact("base", f.base_dir, false);
  for (const std::string& d : f.artifact_dirs) artifact(d, d, true);
  r["artifacts"] = artifacts;

  json quality = json::array(), speed = json::array();
  double base_ppl = 0;
  std::string device;
  for (const StepRecord& s : f.steps) {
    if (s.kind == "ppl") {
      const json& x = s.result;
      if (device.empty()) {
        device = x.value("device", "");
        r["evaluation"] = {{"dataset", o["eval_dataset"]}, {"sha256", f.eval_sha256}, {"ctx", x["ctx"]},
                           {"chunks", x["chunks"]}, {"scored_tokens", x["tokens"]}};
      }
      const double ppl = x["ppl"];
      if (base_ppl == 0) base_ppl = ppl;  // the first evaluation is the base's (pipeline.cc's order)
      quality.push_back({{"artifact", s.artifact}, {"kv", s.kv}, {"kv_scales", s.kv == "fp16" ? "-" : s.kv_scales},
                         {"ppl", ppl}, {"ppl_error", x["ppl_error"]}, {"delta_percent", 100.0 * (ppl / base_ppl - 1)}});
    } else if (s.kind == "bench") {
      for (const json& row : s.result)
        speed.push_back({{"artifact", s.artifact}, {"kv", s.kv}, {"test", row["test"]}, {"tokens_per_second", row["tokens_per_second"]},
                         {"stddev", row["stddev"]}, {"repetitions", row["repetitions"]}, {"backend", row["backend"]}});
    }
  }
  json commands = json::array();
  for (const StepRecord& s : f.steps) commands.push_back({{"step", s.name}, {"command", s.command}});
  r["commands"] = commands;
  r["device"] = device;
  r["quality"] = quality;
  r["speed"] = speed;
  if (!f.speed_note.empty()) r["speed_note"] = f.speed_note;
  if (timings) {
    json steps = json::array();
    double total = 0;
    for (const StepRecord& s : f.steps) {
      steps.push_back({{"step", s.name}, {"seconds", s.seconds}});
      total += s.seconds;
    }
    r["steps"] = steps;
    r["total_seconds"] = total;
  }
  return r;
}

std::string release_plot(const json& r) {
  std::map<std::string, double> bpw;
  for (const json& a : r["artifacts"]) bpw[a["name"]] = a["bits_per_weight"];
  std::vector<QualityPoint> q;
  for (const json& row : r["quality"])
    if (row["kv"] == "fp16") {
      const json* a = nullptr;
      for (const json& x : r["artifacts"])
        if (x["name"] == row["artifact"]) a = &x;
      const std::string label = a ? fmt::format("{} {}", row["artifact"].get<std::string>(), (*a)["weights"].get<std::string>())
                                  : row["artifact"].get<std::string>();
      q.push_back({label, bpw[row["artifact"]], row["ppl"], row["ppl_error"]});
    }
  std::vector<SpeedBar> s;
  std::string title = "Decode speed";
  for (const json& row : r["speed"])
    if (starts_with(row["test"].get<std::string>(), "tg")) {
      s.push_back({fmt::format("{}, KV {}", row["artifact"].get<std::string>(), row["kv"].get<std::string>()),
                   row["tokens_per_second"], row["stddev"]});
      title = fmt::format("Decode speed ({}, batch 1)", row["test"].get<std::string>());
    }
  return release_plot_svg(q, s, title, r.value("speed_note", "not measured"));
}

std::string model_card(const json& r) {
  const std::string name = r["model"]["name"];
  const json& quant = r["quantization"];
  std::string md;
  auto line = [&](const std::string& s = "") { md += s + "\n"; };
  line(fmt::format("# {} — {}TurboMind", name, quant.is_null() ? "" : fmt::format("AWQ int{} g{}, ", quant["w_bits"].get<int>(), quant["group_size"].get<int64_t>())));
  line();
  line(fmt::format("Made by tmkit {} from `{}` ({}, {:.1f} M parameters). Evaluated on {}.", r["tmkit_version"].get<std::string>(),
                   r["model"]["source"].get<std::string>(), r["model"]["architecture"].get<std::string>(),
                   r["model"]["parameters"].get<double>() / 1e6, r["device"].get<std::string>()));
  line();
  line("## Contents");
  line();
  line("| folder | what | weights | bits per weight | size |");
  line("|---|---|---|---|---|");
  for (const json& a : r["artifacts"]) {
    if (a["path"].is_null()) continue;
    const std::string what = a["kind"] == "hf-awq" ? "AutoAWQ GEMM checkpoint (Hugging Face safetensors)"
                                                   : fmt::format("TurboMind workspace, tp {}{}", a["tp"].get<int64_t>(),
                                                                 a["kv_calibrated"].get<bool>() ? ", KV-calibrated" : "");
    line(fmt::format("| `{}/` | {} | {} | {:.2f} | {} |", a["path"].get<std::string>(), what, a["weights"].get<std::string>(),
                     a["bits_per_weight"].get<double>(), size_text(a["bytes"].get<double>())));
  }
  line("| `manifest.json` | every file's size and sha256, the commands | | | |");
  line("| `report.json` | every number below, machine-readable | | | |");
  line();
  line("Bits per weight: 8 x weight bytes / parameters, embeddings and LM head (kept in 16 bits) included; a workspace "
       "counts its own 16-bit elements (it stores tied embeddings twice).");
  line();
  line("## Quality");
  line();
  const json& ev = r["evaluation"];
  line(fmt::format("Perplexity on `{}` (sha256 `{}…`): {} chunks of {} tokens, {} scored tokens; ± is one standard error.",
                   fs::path(ev["dataset"].get<std::string>()).filename().string(), ev["sha256"].get<std::string>().substr(0, 12),
                   ev["chunks"].get<int64_t>(), ev["ctx"].get<int64_t>(), ev["scored_tokens"].get<int64_t>()));
  line();
  line("| artifact | KV cache | scales | perplexity | vs base |");
  line("|---|---|---|---|---|");
  for (const json& q : r["quality"])
    line(fmt::format("| {} | {} | {} | {:.4f} ± {:.4f} | {:+.3f}% |", q["artifact"].get<std::string>(), q["kv"].get<std::string>(),
                     q["kv_scales"].get<std::string>(), q["ppl"].get<double>(), q["ppl_error"].get<double>(),
                     q["delta_percent"].get<double>()));
  line();
  line("`base` is the source checkpoint converted without quantization (not kept). KV `dynamic` is TurboMind's online "
       "per-token quantization (LMDeploy `--quant-policy 8` / `4`); `static` uses the calibrated per-channel scales "
       "kept in the workspace (`kv-calibrate`, evaluated by tmkit's runtime).");
  line();
  line("## Speed");
  line();
  if (r["speed"].empty()) {
    line(fmt::format("Speed {}.", r.value("speed_note", "not measured")));
  } else {
    line("tmkit's runtime (`tm-eval bench`), batch 1: prompt processing (pp) and token generation (tg), tokens/s, mean ± sd.");
    line();
    line("| artifact | KV cache | test | tokens/s | backend |");
    line("|---|---|---|---|---|");
    for (const json& s : r["speed"])
      line(fmt::format("| {} | {} | {} | {:.1f} ± {:.1f} | {} |", s["artifact"].get<std::string>(), s["kv"].get<std::string>(),
                       s["test"].get<std::string>(), s["tokens_per_second"].get<double>(), s["stddev"].get<double>(),
                       s["backend"].get<std::string>()));
  }
  line();
  line("![Perplexity against bits per weight, and decode speed per artifact](plots.svg)");
  line();
  line("## How it was made");
  line();
  if (!quant.is_null() || !r["kv_calibration"].is_null()) {
    const json& c = quant.is_null() ? r["kv_calibration"] : quant["calibration"];
    line(fmt::format("Calibration data: `{}` (sha256 `{}…`), {} blocks of {} tokens{}.",
                     fs::path(c["dataset"].get<std::string>()).filename().string(), c["sha256"].get<std::string>().substr(0, 12),
                     c["samples"].get<int64_t>(), c["seqlen"].get<int64_t>(),
                     quant.is_null() ? " (KV calibration)" : r["kv_calibration"].is_null() ? " (AWQ search)" : " (AWQ search and KV calibration)"));
    line();
  }
  bool scratch = false;
  for (const json& c : r["commands"]) scratch |= c["command"].get<std::string>().find(" .scratch/") != std::string::npos;
  line(scratch ? "Each step ran in this folder; `.scratch/` held what is not kept (the workspace before KV calibration, "
                 "the unquantized base):"
               : "Each step ran in this folder:");
  line();
  line("```sh");
  for (const json& c : r["commands"]) line(c["command"].get<std::string>());
  line("```");
  line();
  line("## Use it with LMDeploy");
  line();
  line("```sh");
  for (const json& a : r["artifacts"]) {
    if (a["path"].is_null()) continue;
    const std::string p = a["path"];
    if (a["kind"] == "turbomind")
      line(fmt::format("lmdeploy serve api_server ./{} --tp {}   # a TurboMind workspace: lmdeploy 0.6.x", p,
                       a["tp"].get<int64_t>()));
    else
      line(fmt::format("lmdeploy serve api_server ./{} --model-format awq --tp 1   # any lmdeploy with AWQ", p));
  }
  line("# add --quant-policy 8 (or 4) for an int8 (int4) KV cache");
  line("```");
  line();
  line("## Check it");
  line();
  line("```sh");
  line("tm-verify .   # every file's size and sha256 against manifest.json, and the layout");
  line("```");
  return md;
}

}  // namespace tmkit
