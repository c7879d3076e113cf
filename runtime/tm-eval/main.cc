// tm-eval: verification runtime for TurboMind workspaces. See README.md beside this file.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <functional>
#include <nlohmann/json.hpp>
#include <thread>

#include "cpu_forward.h"
#include "dataset.h"
#include "error.h"
#include "gpu_model.h"
#include "perplexity.h"
#include "progress.h"
#include "splitmix64.h"
#include "tokenizer.h"

namespace {

using tmkit::fs::path;

struct Options {
  std::string model, tokens, text, device = "auto", output;
  tmkit::DatasetOptions dataset;
  int threads = int(std::max(1u, std::thread::hardware_concurrency()));
  int64_t n = 64, ctx = 512, chunks = 0, prompt = 512, gen = 128, batch = 1;
  int reps = 5;
  int tp = 0;  // 0: the workspace's own
  std::string format = "md";
  bool json = false, quiet = false, force = false, add_special = false;
  std::string kv = "fp16", kv_scales = "dynamic";
};

void add_tp_option(CLI::App* cmd, Options& o) {
  cmd->add_option("--tp", o.tp, "GPUs to run tensor-parallel (default: the workspace's tp; any tp that divides the heads, "
                                "kv heads and inter_size works; the CPU oracle ignores it)")
      ->check(CLI::Range(1, 1024));
}

// The GPU's tensor-parallel size: --tp, else the workspace's own tp when that many devices exist.
int gpu_tp(const Options& o, const tmkit::TmConfig& c) {
  if (o.tp > 0) return o.tp;
  // The workspace's own tp when that many GPUs exist; else one GPU (the ranks merge on loading, so
  // the results are the same up to summation order), said on stderr: a one-GPU machine still runs
  // every workspace, as before tensor parallelism. An explicit --tp never falls back.
  const int n = tmkit::GpuModel::device_count();
  if (c.tp > n) {
    if (!o.quiet)
      fmt::print(stderr, "tm-eval: {} is split for tp {} and {} GPU{} present: running it on one (--tp to choose)\n",
                 o.model, c.tp, n, n == 1 ? " is" : "s are");
    return 1;
  }
  return int(c.tp);
}

void add_model_inputs(CLI::App* cmd, Options& o) {
  cmd->add_option("-m,--model", o.model, "TurboMind workspace folder (any tp, float16 or bfloat16)")->required();
  auto* tokens = cmd->add_option("--tokens", o.tokens, "int32 little-endian token ids");
  auto* text = cmd->add_option("-f,--file", o.text,
                               "text to tokenize with the workspace's tokenizer (a file, a folder of .txt, or .jsonl)");
  tokens->excludes(text);
  cmd->add_option("--text-key", o.dataset.text_key, "the field holding the text in .jsonl input (default: text)");
  cmd->add_option("--device", o.device, "auto (cuda when a GPU is present), cuda, or cpu (the Eigen oracle)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_option("-t,--threads", o.threads, "CPU threads")->check(CLI::Range(1, 1024));
  cmd->add_option("--kv-scales", o.kv_scales,
                  "int8/int4 KV: dynamic (online, per token and kv head, as TurboMind) or static (kv-calibrate's\n"
                  "per kv head and channel scales of the workspace; forwards without a cache, i.e. ppl and logits)")
      ->check(CLI::IsMember({"dynamic", "static"}));
  cmd->add_option("--kv", o.kv, "KV cache: fp16 (full precision), int8 or int4 (TurboMind's online per-token, per-head quantization)")
      ->check(CLI::IsMember({"fp16", "int8", "int4"}));
  add_tp_option(cmd, o);
}

// The runtime under test: the GPU when asked for (or, with auto, present), else the CPU oracle.
struct Runtime {
  std::string device;
  std::unique_ptr<tmkit::CpuModel> cpu;
  std::unique_ptr<tmkit::GpuModel> gpu;
  int threads = 1;

  explicit Runtime(const Options& o) {
    device = o.device == "auto" ? (tmkit::GpuModel::available() ? "cuda" : "cpu") : o.device;
    tmkit::ModelWeights w = tmkit::load_workspace(o.model, device == "cuda" ? tmkit::LoadFor::kGpu : tmkit::LoadFor::kCpu);
    tmkit::KvMode mode = tmkit::KvMode::kFp16;
    tmkit::parse_kv_mode(o.kv, &mode);
    const tmkit::KvQuant kv = tmkit::load_kv_quant(o.model, tmkit::load_tm_config(o.model), mode, o.kv_scales == "static");
    if (device == "cuda") gpu = std::make_unique<tmkit::GpuModel>(w, kv, gpu_tp(o, w.cfg));
    else cpu = std::make_unique<tmkit::CpuModel>(std::move(w), kv);
    threads = gpu ? 1 : o.threads;
  }
  const tmkit::TmConfig& config() const { return gpu ? gpu->config() : cpu->config(); }
  tmkit::Mat forward(const int32_t* t, int64_t T) const { return gpu ? gpu->forward(t, T) : cpu->forward(t, T); }
  // Scores `count` chunks at once: one batched forward on the GPU, one chunk after another on the CPU.
  tmkit::BatchScorer scorer() const {
    if (gpu)
      return [this](const int32_t* t, int64_t count, int64_t T, double* s, double* s2) { gpu->nll_sums_batch(t, count, T, s, s2); };
    const tmkit::ChunkScorer one = tmkit::score_from_logits([this](const int32_t* t, int64_t T) { return cpu->forward(t, T); });
    return [one](const int32_t* t, int64_t count, int64_t T, double* s, double* s2) {
      for (int64_t i = 0; i < count; ++i) one(t + i * T, T, s + i, s2 + i);
    };
  }
  // A CPU run of `concurrent` forwards of T tokens at once (`flag` sized them) is refused up front
  // when the host cannot hold it.
  void check_host_memory(int64_t T, int64_t concurrent, const std::string& flag) const {
    if (cpu) tmkit::check_host_memory(*cpu, T, concurrent, flag);
  }
  std::string name() const { return gpu ? "cuda (" + gpu->device_name() + ")" : "cpu"; }
  int tp() const { return gpu ? gpu->tp() : 1; }  // the oracle runs the merged weights
};

// As llama.cpp does: positions past the trained context are extrapolation (unless dynamic NTK
// scaling stretches RoPE for them), so such a ppl says little about the model.
void warn_past_trained_context(const tmkit::TmConfig& c, int64_t T, const char* flag) {
  if (c.max_position_embeddings > 0 && T > c.max_position_embeddings && !c.use_dynamic_ntk)
    fmt::print(stderr, "tm-eval: warning: {} {} is longer than the model's trained context ({} positions, max_position_embeddings)\n",
               flag, T, c.max_position_embeddings);
}

std::vector<int32_t> input_tokens(const Options& o, int64_t vocab) {
  if (!o.tokens.empty()) return tmkit::read_tokens(o.tokens, vocab);
  if (o.text.empty()) tmkit::fail("give the input as --tokens <ids.i32> or -f <text>");
  const auto tok = tmkit::load_tokenizer(o.model);
  auto ids = tmkit::dataset_tokens(o.text, *tok, o.dataset);
  for (int32_t id : ids)
    if (id >= vocab) tmkit::fail("{}: the tokenizer produced id {}, outside the model's vocabulary [0, {})", o.model, id, vocab);
  return ids;
}

void write_output(const std::string& out, bool force, const void* data, size_t n) {
  tmkit::AtomicOutputFile f(out, force);
  tmkit::write_file(f.tmp(), data, n);
  f.commit();
}

int run_logits(const Options& o) {
  const Runtime model(o);
  const auto ids = input_tokens(o, model.config().vocab_size);
  if (int64_t(ids.size()) < o.n) tmkit::fail("{} tokens, fewer than -n {}", ids.size(), o.n);
  warn_past_trained_context(model.config(), o.n, "-n");
  model.check_host_memory(o.n, 1, "-n");
  const tmkit::Mat l = model.forward(ids.data(), o.n);
  write_output(o.output, o.force, l.data(), size_t(l.size()) * sizeof(float));
  fmt::print(stderr, "tm-eval: wrote logits [{}, {}] to {}\n", l.rows(), l.cols(), o.output);
  return 0;
}

int run_ppl(const Options& o, tmkit::Progress& progress) {
  const Runtime model(o);
  const auto ids = input_tokens(o, model.config().vocab_size);
  warn_past_trained_context(model.config(), o.ctx, "-c");
  int64_t chunks = int64_t(ids.size()) / o.ctx;
  if (o.chunks > 0) chunks = std::min(chunks, o.chunks);
  if (chunks > 0) model.check_host_memory(o.ctx, std::min<int64_t>(std::max(model.threads, 1), chunks), "-c");  // none: said below
  const auto r = tmkit::perplexity_batched(model.scorer(), o.batch, ids, o.ctx, o.chunks, model.threads,
                                           [&](int64_t d, int64_t n, double p) {
                                             progress.update(d, n, double(d), double(n), fmt::format("ppl {:.4f}", p));
                                           });
  progress.finish();
  if (o.json) {
    nlohmann::json j = {{"model", o.model}, {"input", o.tokens.empty() ? o.text : o.tokens}, {"device", model.name()}, {"tp", model.tp()}, {"kv", o.kv}, {"kv_scales", o.kv_scales},
                        {"ctx", o.ctx}, {"ppl", r.ppl}, {"ppl_error", r.ppl_error}, {"mean_nll", r.mean_nll},
                        {"chunks", r.chunks}, {"tokens", r.tokens}, {"seconds", r.seconds},
                        {"tokens_per_second", r.seconds > 0 ? double(r.chunks * o.ctx) / r.seconds : 0.0}};
    fmt::print("{}\n", j.dump(2));
  } else {
    fmt::print("Final estimate: PPL = {:.4f} +/- {:.5f}  ({} chunks of {}, {} scored tokens, {:.1f} s)\n", r.ppl,
               r.ppl_error, r.chunks, o.ctx, r.tokens, r.seconds);
  }
  return 0;
}

// llama-bench style: prompt processing (pp: one prefill of -p tokens) and token generation (tg:
// -n single-token decode steps from an empty cache), tokens/s mean and standard deviation over -r
// repetitions after a warm-up. Token ids are a fixed pseudo-random sequence. With -b B, B sequences
// run in parallel, each with its own cache: pp prefills B prompts in one forward, tg advances the B
// sequences in lockstep (one token each per step); tokens/s counts all B tokens, and the test names
// say the batch ("pp512 @ b8", as llama-bench's "@ d" for depth).
int run_bench(const Options& o) {
  if (o.device == "cpu") tmkit::fail("tm-eval bench: runs on --device cuda (the CPU oracle has no KV cache)");
  const auto load_start = std::chrono::steady_clock::now();
  const tmkit::ModelWeights w = tmkit::load_workspace(o.model, tmkit::LoadFor::kGpu);
  tmkit::KvMode kv = tmkit::KvMode::kFp16;
  tmkit::parse_kv_mode(o.kv, &kv);
  tmkit::GpuModel gpu(w, kv, gpu_tp(o, w.cfg));
  gpu.synchronize();
  const double load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
  const tmkit::TmConfig& c = w.cfg;
  const int64_t B = o.batch;
  std::vector<int32_t> ids(size_t(std::max(o.prompt, o.gen) * B));
  tmkit::SplitMix64 rng{42};
  for (auto& id : ids) id = int32_t(rng.below(uint64_t(c.vocab_size)));
  uint64_t weight_bytes = 0;
  for (const auto& e : tmkit::fs::directory_iterator(tmkit::weights_dir(o.model)))
    if (e.path().filename() != "config.yaml") weight_bytes += tmkit::fs::file_size(e.path());
  double params = double(w.embed.size() + w.output.size() + w.norm.size());
  for (const auto& l : w.layers) {
    params += double(l.attn_norm.size() + l.ffn_norm.size() + l.bq.size() + l.bk.size() + l.bv.size() + l.bo.size());
    if (l.qkv4)  // loaded for the GPU: the int4 linears only
      for (const auto* q : {&l.qkv4, &l.wo4, &l.w13_4, &l.w2_4}) params += double((*q)->K) * double((*q)->N);
    else
      params += double(l.wq.size() + l.wk.size() + l.wv.size() + l.wo.size() + l.w1.size() + l.w3.size() + l.w2.size());
  }

  auto time_it = [&](auto&& body) {
    gpu.synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    body();
    gpu.synchronize();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  auto pp = [&] { gpu.reset(o.prompt, B); gpu.append(ids.data(), o.prompt); };  // sequence b: ids[b p ..]
  auto tg = [&] { gpu.reset(o.gen, B); for (int64_t i = 0; i < o.gen; ++i) gpu.append(ids.data() + i * B, 1); };
  const std::string at_batch = B > 1 ? fmt::format(" @ b{}", B) : "";
  struct Row { std::string test; double mean, sd; };
  std::vector<Row> rows;
  for (auto [name, tokens, body] : {std::tuple{fmt::format("pp{}{}", o.prompt, at_batch), o.prompt * B, std::function<void()>(pp)},
                                    std::tuple{fmt::format("tg{}{}", o.gen, at_batch), o.gen * B, std::function<void()>(tg)}}) {
    if (tokens <= 0) continue;
    time_it(body);  // warm-up: handles, buffers, clocks
    std::vector<double> rate;
    for (int r = 0; r < o.reps; ++r) rate.push_back(double(tokens) / time_it(body));
    double mean = 0, var = 0;
    for (double x : rate) mean += x / double(rate.size());
    for (double x : rate) var += (x - mean) * (x - mean) / std::max<double>(1, double(rate.size()) - 1);
    rows.push_back({name, mean, std::sqrt(var)});
  }
  const std::string model = fmt::format("{} {}", c.model_name.empty() ? c.model_arch : c.model_name, c.weight_type);
  const std::string backend = "CUDA (" + gpu.device_name() + ")";
  if (o.format == "json") {
    nlohmann::json j = nlohmann::json::array();
    for (const Row& r : rows)
      j.push_back({{"model", model}, {"weight_bytes", weight_bytes}, {"params", params}, {"backend", backend},
                   {"tp", gpu.tp()}, {"kv", o.kv}, {"test", r.test}, {"tokens_per_second", r.mean}, {"stddev", r.sd}, {"repetitions", o.reps},
                   {"load_seconds", load_seconds}});
    fmt::print("{}\n", j.dump(2));
  } else if (o.format == "csv") {
    fmt::print("model,size_gib,params_b,backend,kv,test,t_per_s,stddev\n");
    for (const Row& r : rows)
      fmt::print("{},{:.3f},{:.3f},{},{},{},{:.2f},{:.2f}\n", model, weight_bytes / 1073741824.0, params / 1e9, backend, o.kv,
                 r.test, r.mean, r.sd);
  } else {
    fmt::print("| model | size | params | backend | kv | test | t/s |\n| --- | ---: | ---: | --- | --- | ---: | ---: |\n");
    for (const Row& r : rows)
      fmt::print("| {} | {:.2f} GiB | {:.2f} M | {} | {} | {} | {:.2f} ± {:.2f} |\n", model, weight_bytes / 1073741824.0,
                 params / 1e6, backend, o.kv, r.test, r.mean, r.sd);
  }
  return 0;
}

int run_tokenize(const Options& o) {
  const auto tok = tmkit::load_tokenizer(o.model);
  const auto ids = o.add_special ? tok->encode(tmkit::join_documents(tmkit::load_documents(o.text, o.dataset)), true)
                                 : tmkit::dataset_tokens(o.text, *tok, o.dataset);
  write_output(o.output, o.force, ids.data(), ids.size() * sizeof(int32_t));
  if (!o.quiet) fmt::print(stderr, "tm-eval: {} tokens ({}) written to {}\n", ids.size(), tok->kind(), o.output);
  return 0;
}

int run_detokenize(const Options& o) {
  const auto tok = tmkit::load_tokenizer(o.model);
  const std::string text = tok->decode(tmkit::read_tokens(o.tokens, tok->vocab_size()));
  if (o.output.empty()) fmt::print("{}", text);
  else write_output(o.output, o.force, text.data(), text.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tm-eval: run a TurboMind workspace to verify it (logits, perplexity), and its tokenizer"};
  app.require_subcommand(1);
  Options o;

  CLI::App* logits = app.add_subcommand("logits", "write fp32 logits [n, vocab] of the first n tokens, row-major");
  add_model_inputs(logits, o);
  logits->add_option("-n", o.n, "number of tokens (one sequence, positions 0..n-1)")->check(CLI::Range(1, 1 << 20));
  logits->add_option("-o,--output", o.output, "output .f32 file")->required();
  logits->add_flag("--force", o.force, "replace an existing output");

  CLI::App* ppl = app.add_subcommand("ppl", "perplexity: non-overlapping chunks of -c tokens, each chunk's first token unscored");
  add_model_inputs(ppl, o);
  ppl->add_option("-c,--ctx-size", o.ctx, "tokens per chunk")->check(CLI::Range(2, 1 << 20));
  ppl->add_option("--chunks", o.chunks, "score only the first N chunks (default: all)")->check(CLI::NonNegativeNumber);
  ppl->add_option("-b,--batch", o.batch, "chunks per forward batch on the GPU (the CPU scores them one by one)")
      ->check(CLI::Range(1, 65535));
  ppl->add_flag("--json", o.json, "print a JSON report on stdout");
  ppl->add_flag("-q,--quiet", o.quiet, "no progress on stderr");

  CLI::App* bench = app.add_subcommand("bench", "llama-bench style speed: prompt processing (pp) and token generation (tg)");
  bench->add_option("-m,--model", o.model, "TurboMind workspace folder")->required();
  bench->add_option("-p,--n-prompt", o.prompt, "prompt tokens for pp (0: skip)")->check(CLI::Range(0, 1 << 20));
  bench->add_option("-n,--n-gen", o.gen, "generated tokens for tg (0: skip)")->check(CLI::Range(0, 1 << 20));
  bench->add_option("-r,--repetitions", o.reps, "repetitions (mean and standard deviation)")->check(CLI::Range(1, 1000));
  bench->add_option("-b,--batch", o.batch, "sequences in parallel, each with its own KV cache (tokens/s counts all)")
      ->check(CLI::Range(1, 65535));
  bench->add_option("-o,--output", o.format, "md, csv or json")->check(CLI::IsMember({"md", "csv", "json"}));
  bench->add_option("--device", o.device, "cuda (auto picks it when present)")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  bench->add_option("--kv", o.kv, "KV cache: fp16, int8 or int4")->check(CLI::IsMember({"fp16", "int8", "int4"}));
  add_tp_option(bench, o);

  CLI::App* tokenize = app.add_subcommand("tokenize", "text -> int32 token ids with the model's own tokenizer");
  tokenize->add_option("-m,--model", o.model, "HF model folder, workspace, or tokenizer.json / tokenizer.model")->required();
  tokenize->add_option("-f,--file", o.text, "text: a file, a folder of .txt files, or .jsonl (documents joined by a blank line)")->required();
  tokenize->add_option("-o,--output", o.output, "output .i32 file")->required();
  tokenize->add_option("--text-key", o.dataset.text_key, "the field holding the text in .jsonl input (default: text)");
  tokenize->add_flag("--add-special", o.add_special, "apply the post-processor (e.g. prepend BOS)");
  tokenize->add_flag("--force", o.force, "replace an existing output");
  tokenize->add_flag("-q,--quiet", o.quiet, "no summary on stderr");

  CLI::App* detokenize = app.add_subcommand("detokenize", "int32 token ids -> text");
  detokenize->add_option("-m,--model", o.model, "HF model folder, workspace, or tokenizer.json / tokenizer.model")->required();
  detokenize->add_option("--tokens", o.tokens, "int32 little-endian token ids")->required();
  detokenize->add_option("-o,--output", o.output, "output text file (default: stdout)");
  detokenize->add_flag("--force", o.force, "replace an existing output");

  CLI11_PARSE(app, argc, argv);
  tmkit::Progress progress("tm-eval ppl", "chunks", !o.quiet);
  try {
    if (logits->parsed()) return run_logits(o);
    if (ppl->parsed()) return run_ppl(o, progress);
    if (tokenize->parsed()) return run_tokenize(o);
    if (bench->parsed()) return run_bench(o);
    return run_detokenize(o);
  } catch (const std::exception& e) {
    progress.finish();
    fmt::print(stderr, "tm-eval: error: {}\n", tmkit::error_message(e));
    return 1;
  }
}
