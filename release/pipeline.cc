#include "pipeline.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>

#include "error.h"
#include "manifest.h"
#include "model_card.h"
#include "sha256.h"
#include "subprocess.h"
#include "turbomind.h"

#ifndef TMKIT_VERSION
#define TMKIT_VERSION "0.0.0"
#endif

namespace tmkit {

using nlohmann::json;

std::string tmkit_version() { return TMKIT_VERSION; }

namespace {

constexpr const char* kStateFile = ".release-state.json";
constexpr const char* kScratch = ".scratch";
constexpr const char* kLogs = ".logs";

// One step: a tool's command line, run in the repository folder.
struct Step {
  std::string name;               // also the name of its log files
  std::vector<std::string> argv;  // the tool's name first
  std::string output;             // the folder it creates, relative to the repository ("": none)
  enum Kind { kArtifact, kPpl, kBench } kind = kArtifact;
  std::string artifact, kv = "fp16", kv_scales = "dynamic";  // what a ppl / bench step measures
};

Step artifact_step(std::string name, std::vector<std::string> argv, std::string output) {
  Step s;
  s.name = std::move(name), s.argv = std::move(argv), s.output = std::move(output);
  return s;
}

std::string quote(const std::string& a) {
  if (!a.empty() && a.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:,+@") ==
                        std::string::npos)
    return a;
  std::string q = "'";
  for (char c : a) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string command_line(const std::vector<std::string>& argv) {
  std::string s;
  for (const std::string& a : argv) {
    if (!s.empty()) s += ' ';
    s += quote(a);
  }
  return s;
}

std::string workspace_name(int64_t tp) { return fmt::format("turbomind-tp{}", tp); }

// The options that decide the repository's content: everything but how to run.
json options_json(const ReleaseOptions& o) {
  return {{"model", o.model.string()},        {"quantize", o.quantize},           {"w_bits", o.w_bits},
          {"group", o.group},                 {"tp", o.tps},                      {"kv_calibrate", o.kv_calibrate},
          {"calib_dataset", o.calib_dataset}, {"calib_samples", o.calib_samples}, {"calib_seqlen", o.calib_seqlen},
          {"eval_dataset", o.eval_dataset},   {"eval_ctx", o.eval_ctx},           {"eval_chunks", o.eval_chunks},
          {"bench", {o.bench_prompt, o.bench_gen, o.bench_reps}}, {"device", o.device}, {"timings", o.timings}};
}

// The unquantized workspace that quality is measured against.
std::string base_workspace(const ReleaseOptions& o) {
  return o.quantize ? std::string(kScratch) + "/base" : workspace_name(o.tps.front());
}

std::vector<Step> plan(const ReleaseOptions& o) {
  std::vector<Step> steps;
  const std::string calib_n = std::to_string(o.calib_samples), calib_len = std::to_string(o.calib_seqlen);
  const int64_t tp0 = o.tps.front();
  const std::string first = workspace_name(tp0);
  std::string source = o.model.string();
  if (o.quantize) {
    steps.push_back(artifact_step("quantize",
                     {"awq-quantize", source, "--work-dir", "hf-awq", "--w-bits", std::to_string(o.w_bits), "--w-group-size",
                      std::to_string(o.group), "--calib-dataset", o.calib_dataset, "--calib-samples", calib_n,
                      "--calib-seqlen", calib_len, "--device", o.device, "--json", "-q"},
                     "hf-awq"));
    source = "hf-awq";
  }
  // With KV calibration the converted workspace is an intermediate: kv-calibrate writes the kept
  // one beside it (hard links and its own files), so each step owns exactly one folder.
  const std::string converted = o.kv_calibrate ? std::string(kScratch) + "/converted" : first;
  steps.push_back(
      artifact_step("convert", {"hf2tm", source, "--dst-path", converted, "--tp", std::to_string(tp0), "--json", "-q"}, converted));
  if (o.kv_calibrate)
    steps.push_back(artifact_step("kv-calibrate",
                     {"kv-calibrate", converted, "--dst-path", first, "--calib-dataset", o.calib_dataset, "--calib-samples",
                      calib_n, "--calib-seqlen", calib_len, "--device", o.device, "--json", "-q"},
                     first));
  for (size_t i = 1; i < o.tps.size(); ++i)
    steps.push_back(artifact_step(
        "shard-tp" + std::to_string(o.tps[i]),
        {"tm-shard", first, "--tp", std::to_string(o.tps[i]), "--dst-path", workspace_name(o.tps[i]), "--json", "-q"},
        workspace_name(o.tps[i])));
  const std::string base = base_workspace(o);
  if (o.quantize)  // the source as it is, for the quality baseline (not kept in the repository)
    steps.push_back(artifact_step("convert-base", {"hf2tm", o.model.string(), "--dst-path", base, "--json", "-q"}, base));

  const bool tokens = o.eval_dataset.size() > 4 && o.eval_dataset.substr(o.eval_dataset.size() - 4) == ".i32";
  auto ppl = [&](const std::string& artifact, const std::string& ws, const std::string& kv, const std::string& scales) {
    Step s{"ppl-" + artifact + (kv == "fp16" ? "" : "-kv-" + kv + "-" + scales),
           {"tm-eval", "ppl", "-m", ws, tokens ? "--tokens" : "-f", o.eval_dataset, "-c", std::to_string(o.eval_ctx)},
           "", Step::kPpl, artifact, kv, scales};
    if (o.eval_chunks > 0) s.argv.insert(s.argv.end(), {"--chunks", std::to_string(o.eval_chunks)});
    if (kv != "fp16") s.argv.insert(s.argv.end(), {"--kv", kv, "--kv-scales", scales});
    s.argv.insert(s.argv.end(), {"--device", o.device, "--json", "-q"});
    steps.push_back(s);
  };
  if (o.quantize) ppl("base", base, "fp16", "dynamic");
  for (int64_t tp : o.tps) ppl(workspace_name(tp), workspace_name(tp), "fp16", "dynamic");
  for (const char* kv : {"int8", "int4"}) {
    ppl(first, first, kv, "dynamic");
    if (o.kv_calibrate) ppl(first, first, kv, "static");
  }
  if (o.timings) {  // speed on the GPU (tm-eval bench has no CPU path); skipped at run time without one
    auto bench = [&](const std::string& artifact, const std::string& ws, const std::string& kv) {
      steps.push_back({"bench-" + artifact + (kv == "fp16" ? "" : "-kv-" + kv),
                       {"tm-eval", "bench", "-m", ws, "-p", std::to_string(o.bench_prompt), "-n", std::to_string(o.bench_gen),
                        "-r", std::to_string(o.bench_reps), "--kv", kv, "-o", "json"},
                       "", Step::kBench, artifact, kv, "dynamic"});
    };
    if (o.quantize) bench("base", base, "fp16");
    for (int64_t tp : o.tps) bench(workspace_name(tp), workspace_name(tp), "fp16");
    for (const char* kv : {"int8", "int4"}) bench(first, first, kv);
  }
  return steps;
}

void write_atomically(const fs::path& path, const std::string& text) {
  AtomicOutputFile f(path, /*overwrite=*/true);
  write_file(f.tmp(), text);
  f.commit();
}

// The state of a partial repository: the options and every finished step.
struct State {
  json j;
  static State fresh(const json& inputs) {
    return {json{{"format", "tmkit release state"}, {"options", inputs}, {"steps", json::object()}}};
  }
  json* step(const std::string& name) { return j["steps"].contains(name) ? &j["steps"][name] : nullptr; }
  void save(const fs::path& partial) const { write_atomically(partial / kStateFile, j.dump(1) + "\n"); }
};

std::string dataset_digest(const std::string& path) {
  const fs::path p(path);
  if (fs::is_regular_file(p)) return sha256_file(p);
  if (!fs::is_directory(p)) fail("{}: no such file or folder", path);
  std::string listing;  // a folder: the digest of its files' digests, in path order
  for (const auto& [rel, e] : scan_files(p, p)) listing += rel + " " + e.sha256 + "\n";
  return sha256_hex(listing);
}

// An exclusive lock on a folder for this process's life (flock: released when the process ends,
// however it ends), so that two runs never write one partial repository.
class FolderLock {
 public:
  explicit FolderLock(const fs::path& dir) : fd_(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)) {
    if (fd_ < 0) fail("{}: cannot open", dir.string());
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd_);
      fail("{}: another release-model is writing it", dir.string());
    }
  }
  ~FolderLock() { ::close(fd_); }
  FolderLock(const FolderLock&) = delete;
  FolderLock& operator=(const FolderLock&) = delete;

 private:
  int fd_;
};

class Pipeline {
 public:
  explicit Pipeline(const ReleaseOptions& o)
      : o_(o),
        partial_(o.out.string() + ".partial"),
        calib_sha256_(o.quantize || o.kv_calibrate ? dataset_digest(o.calib_dataset) : ""),
        eval_sha256_(dataset_digest(o.eval_dataset)) {}
  void run();

 private:
  void log(const std::string& line) const {
    if (!o_.quiet) fmt::print(stderr, "release-model: {}\n", line);
  }
  bool verified(const Step& s, const json& rec) const;
  json run_step(const Step& s, size_t index, size_t count);
  void finish(const std::vector<Step>& steps);

  // What decides the repository: the options and the data's content (a resume over other data
  // than the interrupted run's is refused).
  json inputs() const {
    json j = options_json(o_);
    j["calib_sha256"] = calib_sha256_;
    j["eval_sha256"] = eval_sha256_;
    return j;
  }

  const ReleaseOptions& o_;
  fs::path partial_;
  std::string calib_sha256_, eval_sha256_;
  State state_;
  std::unique_ptr<FolderLock> lock_;
  bool gpu_ = false;  // the evaluations ran on a GPU (so the benches can)
};

bool Pipeline::verified(const Step& s, const json& rec) const {
  if (s.output.empty()) return true;
  const FileTable want = file_table_from_json(rec.at("files"), kStateFile);
  if (!verify_files(partial_, want).empty()) return false;
  return scan_files(partial_, partial_ / s.output).size() == want.size();
}

json Pipeline::run_step(const Step& s, size_t index, size_t count) {
  const fs::path tool = (o_.bin_dir.empty() ? own_bin_dir() : o_.bin_dir) / s.argv[0];
  if (!fs::exists(tool)) fail("step {}: {} not found (build it, or point --bin-dir at tmkit's tools)", s.name, tool.string());
  std::vector<std::string> argv = s.argv;
  argv[0] = tool.string();
  if (!s.output.empty()) fs::remove_all(partial_ / s.output);
  fs::create_directories(partial_ / kLogs);
  if (!s.output.empty()) fs::create_directories((partial_ / s.output).parent_path());
  const fs::path out_log = partial_ / kLogs / (s.name + ".json"), err_log = partial_ / kLogs / (s.name + ".log");
  log(fmt::format("[{}/{}] {}: {}", index, count, s.name, command_line(s.argv)));
  const auto t0 = std::chrono::steady_clock::now();
  const ProcessResult r = run_process(argv, partial_, out_log, err_log);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  log(fmt::format("[{}/{}] {}: {} in {:.2f} s", index, count, s.name, r.status ? "failed" : "done", seconds));
  if (r.status != 0) {
    if (!s.output.empty()) fs::remove_all(partial_ / s.output);
    fail("step {} failed (exit {}): {} [log: {}; {} is kept for --resume]", s.name, r.status,
         r.error_tail.empty() ? "no message" : r.error_tail, err_log.string(), partial_.string());
  }
  json result;
  try {
    result = json::parse(read_text_file(out_log));
  } catch (const json::exception& e) {
    fail("step {}: its JSON report ({}) does not parse: {}", s.name, out_log.string(), e.what());
  }
  json rec = {{"command", command_line(s.argv)}, {"result", result}, {"seconds", seconds}};
  if (!s.output.empty()) rec["files"] = file_table_json(scan_files(partial_, partial_ / s.output));
  return rec;
}

void Pipeline::run() {
  const fs::path& out = o_.out;
  if (fs::exists(out) && !o_.force) {
    if (!o_.resume) fail("{} exists (--force replaces it; --resume checks it)", out.string());
    if (!fs::exists(partial_)) {
      const auto problems = verify_repository(out);
      if (!problems.empty()) fail("{} exists and does not verify: {}", out.string(), problems.front());
      log(fmt::format("{} is complete and verifies; nothing to do", out.string()));
      return;
    }
  }
  state_ = State::fresh(inputs());
  if (fs::exists(partial_)) {
    lock_ = std::make_unique<FolderLock>(partial_);
    if (!o_.resume && !o_.force)
      fail("{} holds an interrupted run: --resume continues it, --force starts over", partial_.string());
    if (o_.resume && fs::exists(partial_ / kStateFile)) {
      try {
        state_.j = json::parse(read_text_file(partial_ / kStateFile));
      } catch (const json::exception& e) {
        fail("{}: not valid JSON ({}); remove {} to start over", (partial_ / kStateFile).string(), e.what(), partial_.string());
      }
      if (state_.j.value("options", json()) != inputs())
        fail("--resume: {} was started with other options or data (the model, the datasets and their content, tp, "
             "quantization and evaluation settings must be the same)", partial_.string());
    } else if (o_.resume && fs::exists(partial_ / kManifestFile) && verify_repository(partial_).empty()) {
      move_into_place(partial_, out, /*overwrite=*/true);  // interrupted between the manifest and the rename
      log(fmt::format("{} completed", out.string()));
      return;
    } else {
      fs::remove_all(partial_);
    }
  }
  if (!fs::exists(partial_)) {
    fs::create_directories(partial_);
    lock_ = std::make_unique<FolderLock>(partial_);
  }

  const std::vector<Step> steps = plan(o_);
  bool chain = true;  // every step so far was skipped: a later one may be too
  for (size_t i = 0; i < steps.size(); ++i) {
    const Step& s = steps[i];
    if (s.kind == Step::kBench && !gpu_) continue;
    const json* rec = state_.step(s.name);
    if (chain && rec && verified(s, *rec)) {
      log(fmt::format("[{}/{}] {}: done before, verified", i + 1, steps.size(), s.name));
    } else {
      chain = false;
      for (size_t k = i; k < steps.size(); ++k) state_.j["steps"].erase(steps[k].name);
      state_.save(partial_);
      state_.j["steps"][s.name] = run_step(s, i + 1, steps.size());
      state_.save(partial_);
    }
    if (s.kind == Step::kPpl) gpu_ = state_.j["steps"][s.name]["result"].value("device", "").rfind("cuda", 0) == 0;
  }
  finish(steps);
}

void Pipeline::finish(const std::vector<Step>& steps) {
  ReleaseFacts f;
  f.options = options_json(o_);
  f.version = tmkit_version();
  f.model_name = o_.model.lexically_normal().filename().string();
  if (f.model_name.empty()) f.model_name = o_.model.lexically_normal().parent_path().filename().string();
  f.calib_sha256 = calib_sha256_;
  f.eval_sha256 = eval_sha256_;
  f.base_dir = base_workspace(o_);
  for (const Step& s : steps) {
    const json* rec = state_.step(s.name);
    if (!rec) continue;
    StepRecord r;
    r.name = s.name;
    r.command = (*rec)["command"];
    r.result = (*rec)["result"];
    r.seconds = (*rec)["seconds"];
    r.output = s.output;
    r.kind = s.kind == Step::kPpl ? "ppl" : s.kind == Step::kBench ? "bench" : "artifact";
    r.artifact = s.artifact, r.kv = s.kv, r.kv_scales = s.kv_scales;
    if (!s.output.empty()) {
      r.files = file_table_from_json((*rec)["files"], kStateFile);
      if (s.output.rfind(kScratch, 0) != 0) f.artifact_dirs.push_back(s.output);
    }
    f.steps.push_back(std::move(r));
  }
  f.speed_note = !o_.timings ? "not measured (--no-timings)" : gpu_ ? "" : "not measured: tm-eval bench needs a GPU";
  const json report = release_report(f, partial_, o_.timings);
  // Only the artifacts stay: intermediates, logs, the state, and whatever a killed step left
  // behind (a tool's temporary sibling folder) go.
  std::vector<fs::path> leftovers;
  for (const auto& e : fs::directory_iterator(partial_))
    if (std::find(f.artifact_dirs.begin(), f.artifact_dirs.end(), e.path().filename().string()) == f.artifact_dirs.end())
      leftovers.push_back(e.path());
  for (const fs::path& p : leftovers) fs::remove_all(p);

  write_file(partial_ / kReportFile, report_text(report));
  write_file(partial_ / "plots.svg", release_plot(report));
  write_file(partial_ / "README.md", model_card(report));
  json manifest = {{"format", "tmkit release manifest"},
                   {"version", 1},
                   {"tmkit_version", f.version},
                   {"model", {{"name", f.model_name}, {"source", o_.model.string()}}},
                   {"commands", report["commands"]},
                   {"artifacts", report["artifacts"]},
                   {"files", file_table_json(scan_files(partial_, partial_))}};
  write_file(partial_ / kManifestFile, manifest.dump(2) + "\n");
  const auto problems = verify_repository(partial_);
  if (!problems.empty()) fail("{}: the finished repository does not verify: {}", partial_.string(), problems.front());
  // An existing --out is here only with --force: it goes once the new one is in place.
  move_into_place(partial_, o_.out, /*overwrite=*/true);
  log(fmt::format("wrote {} ({} files); check it with tm-verify", o_.out.string(), manifest["files"].size()));
}

}  // namespace

void run_release(const ReleaseOptions& opt) {
  if (opt.tps.empty()) fail("--tp: no tensor-parallel size");
  for (int64_t tp : opt.tps)
    if (tp < 1) fail("--tp: {} is not a positive size", tp);
  if (!fs::is_directory(opt.model) || !fs::exists(opt.model / "config.json"))
    fail("{}: not a Hugging Face model folder (no config.json)", opt.model.string());
  if ((opt.quantize || opt.kv_calibrate) && opt.calib_dataset.empty()) fail("--calib-dataset is required to quantize or calibrate");
  for (const std::string& d : {opt.calib_dataset, opt.eval_dataset})
    if (!d.empty() && !fs::exists(d)) fail("{}: no such file or folder", d);
  if (opt.eval_dataset.empty()) fail("--eval-dataset is required");
  // --force and the cleanup of <out>.partial must never delete an input.
  for (const fs::path& dst : {opt.out, fs::path(opt.out.string() + ".partial")}) {
    check_not_inside(dst, opt.model, "--out");
    for (const std::string& d : {opt.calib_dataset, opt.eval_dataset}) {
      const fs::path a = fs::weakly_canonical(dst), b = fs::weakly_canonical(d);
      if (!d.empty() && std::mismatch(a.begin(), a.end(), b.begin(), b.end()).first == a.end())
        fail("--out {}: holds the dataset {}", opt.out.string(), d);
    }
  }
  Pipeline(opt).run();
}

}  // namespace tmkit
