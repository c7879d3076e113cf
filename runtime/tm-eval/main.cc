// tm-eval: verification runtime for TurboMind workspaces. See README.md beside this file.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <thread>

#include "cpu_forward.h"
#include "error.h"
#include "perplexity.h"
#include "progress.h"

namespace {

struct Common {
  std::string model, tokens, device = "cpu";
  int threads = int(std::max(1u, std::thread::hardware_concurrency()));
};

void add_common(CLI::App* cmd, Common& c) {
  cmd->add_option("-m,--model", c.model, "TurboMind workspace folder (any tp, float16 or bfloat16)")->required();
  cmd->add_option("--tokens", c.tokens, "int32 little-endian token ids")->required();
  cmd->add_option("--device", c.device, "cpu (the Eigen oracle)")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("-t,--threads", c.threads, "CPU threads")->check(CLI::Range(1, 1024));
}

tmkit::CpuModel load_model(const Common& c) {
  if (c.device != "cpu") tmkit::fail("--device {}: this build has only the CPU runtime", c.device);
  return tmkit::CpuModel(tmkit::load_workspace(c.model));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tm-eval: run a TurboMind workspace to verify it (logits, perplexity)"};
  app.require_subcommand(1);

  Common lc;
  int64_t n_tokens = 64;
  std::string out;
  bool force = false;
  CLI::App* logits = app.add_subcommand("logits", "write fp32 logits [n, vocab] of the first n tokens, row-major");
  add_common(logits, lc);
  logits->add_option("-n", n_tokens, "number of tokens (one sequence, positions 0..n-1)")->check(CLI::Range(1, 1 << 20));
  logits->add_option("-o,--output", out, "output .f32 file")->required();
  logits->add_flag("--force", force, "replace an existing output");

  Common pc;
  int64_t ctx = 512, chunks = 0;
  bool json = false, quiet = false;
  CLI::App* ppl = app.add_subcommand("ppl", "perplexity: non-overlapping chunks of -c tokens, each chunk's first token unscored");
  add_common(ppl, pc);
  ppl->add_option("-c,--ctx-size", ctx, "tokens per chunk")->check(CLI::Range(2, 1 << 20));
  ppl->add_option("--chunks", chunks, "score only the first N chunks (default: all)")->check(CLI::NonNegativeNumber);
  ppl->add_flag("--json", json, "print a JSON report on stdout");
  ppl->add_flag("-q,--quiet", quiet, "no progress on stderr");

  CLI11_PARSE(app, argc, argv);
  tmkit::Progress progress("tm-eval ppl", "chunks", !quiet);
  try {
    if (logits->parsed()) {
      const tmkit::CpuModel model = load_model(lc);
      const auto ids = tmkit::read_tokens(lc.tokens, model.config().vocab_size);
      if (int64_t(ids.size()) < n_tokens) tmkit::fail("{}: {} tokens, fewer than -n {}", lc.tokens, ids.size(), n_tokens);
      const tmkit::Mat l = model.forward(ids.data(), n_tokens);
      tmkit::AtomicOutputFile f(out, force);
      tmkit::write_file(f.tmp(), l.data(), size_t(l.size()) * sizeof(float));
      f.commit();
      fmt::print(stderr, "tm-eval: wrote logits [{}, {}] to {}\n", l.rows(), l.cols(), out);
      return 0;
    }
    const tmkit::CpuModel model = load_model(pc);
    const auto ids = tmkit::read_tokens(pc.tokens, model.config().vocab_size);
    auto forward = [&](const int32_t* t, int64_t T) { return model.forward(t, T); };
    const auto r = tmkit::perplexity(forward, ids, ctx, chunks, pc.threads, [&](int64_t d, int64_t n, double p) {
      progress.update(d, n, double(d), double(n), fmt::format("ppl {:.4f}", p));
    });
    progress.finish();
    if (json) {
      nlohmann::json j = {{"model", pc.model}, {"tokens_file", pc.tokens}, {"device", pc.device}, {"ctx", ctx},
                          {"ppl", r.ppl}, {"ppl_error", r.ppl_error}, {"mean_nll", r.mean_nll},
                          {"chunks", r.chunks}, {"tokens", r.tokens}, {"seconds", r.seconds},
                          {"tokens_per_second", r.seconds > 0 ? double(r.chunks * ctx) / r.seconds : 0.0}};
      fmt::print("{}\n", j.dump(2));
    } else {
      fmt::print("Final estimate: PPL = {:.4f} +/- {:.5f}  ({} chunks of {}, {} scored tokens, {:.1f} s)\n", r.ppl,
                 r.ppl_error, r.chunks, ctx, r.tokens, r.seconds);
    }
    return 0;
  } catch (const std::exception& e) {
    progress.finish();
    fmt::print(stderr, "tm-eval: error: {}\n", e.what());
    return 1;
  }
}
