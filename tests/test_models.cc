// The shared models end to end: HF -> workspace (tp 1 and 2) -> CPU oracle, against the golden
// logits and perplexities that PyTorch + transformers produced (shared/reference/<model>/).
#include <gtest/gtest.h>

#include <map>
#include <mutex>
#include <nlohmann/json.hpp>

#include "cpu_forward.h"
#include "hf2tm.h"
#include "rtn.h"
#include "perplexity.h"
#include "kv_quant.h"
#include "error.h"
#include "test_util.h"
#include "workspace_cache.h"

using namespace tmkit;
using json = nlohmann::json;

namespace {

fs::path workspace(const std::string& model, int64_t tp) { return test::cached_workspace(model, tp); }

json reference(const std::string& model) {
  return json::parse(test::slurp(test::reference_dir(model) / "reference.json"));
}

std::vector<int32_t> eval_tokens(const std::string& model, int64_t vocab) {
  return read_tokens(test::reference_dir(model) / "eval.tokens.i32", vocab);
}

json run_json(const std::string& cmd) {
  test::RunResult r = test::run(cmd);
  EXPECT_EQ(r.code, 0) << cmd << "\n" << r.err;
  return json::parse(r.out);
}

}  // namespace

class Logits64 : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(Logits64, MatchReference) {
  const auto [model, tp] = GetParam();
  const CpuModel m(load_workspace(workspace(model, tp)));
  const auto ids = eval_tokens(model, m.config().vocab_size);
  const Mat logits = m.forward(ids.data(), 64);
  const auto ref = test::read_array<float>(test::reference_dir(model) / "logits64.f32");
  ASSERT_EQ(size_t(logits.size()), ref.size());
  const double err = test::rel_l2(std::vector<float>(logits.data(), logits.data() + logits.size()), ref);
  EXPECT_LE(err, 2e-3) << model << " tp" << tp;
  RecordProperty("rel_l2", std::to_string(err));
}

INSTANTIATE_TEST_SUITE_P(Models, Logits64,
                         ::testing::Combine(::testing::Values("tiny-llama", "tiny-qwen2", "small-llama"),
                                            ::testing::Values(1, 2)),
                         [](const auto& info) {
                           std::string n = std::get<0>(info.param) + "_tp" + std::to_string(std::get<1>(info.param));
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

TEST(LogitsCli, WritesTheOracleLogits) {
  test::TempDir tmp;
  const fs::path ws = workspace("tiny-qwen2", 2);
  const auto r = test::run(test::tool("tm-eval") + " logits -m " + test::q(ws) + " --tokens " +
                           test::q(test::reference_dir("tiny-qwen2") / "eval.tokens.i32") + " -n 64 -o " + test::q(tmp / "l.f32"));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto got = test::read_array<float>(tmp / "l.f32");
  const auto ref = test::read_array<float>(test::reference_dir("tiny-qwen2") / "logits64.f32");
  ASSERT_EQ(got.size(), ref.size());
  EXPECT_LE(test::rel_l2(got, ref), 2e-3);
}

// Full eval perplexity through the tool, against reference.json's ppl_fp16 (0.2%).
class FullPerplexity : public ::testing::TestWithParam<std::string> {};

TEST_P(FullPerplexity, WithinTolerance) {
  const std::string model = GetParam();
  const json ref = reference(model);
  const int64_t ctx = ref["eval_ctx"];
  const json r = run_json(test::tool("tm-eval") + " ppl -q --json -m " + test::q(workspace(model, 1)) + " --tokens " +
                          test::q(test::reference_dir(model) / "eval.tokens.i32") + " -c " + std::to_string(ctx));
  EXPECT_EQ(r["chunks"].get<int64_t>(), ref["chunks"].get<int64_t>());
  EXPECT_EQ(r["tokens"].get<int64_t>(), ref["scored_tokens"].get<int64_t>());
  const double ppl = r["ppl"], want = ref["ppl_fp16"];
  EXPECT_LE(std::abs(ppl / want - 1.0), 2e-3) << model << ": ppl " << ppl << " vs ppl_fp16 " << want;
  EXPECT_GT(r["ppl_error"].get<double>(), 0.0);
  RecordProperty("ppl", std::to_string(ppl));
}

INSTANTIATE_TEST_SUITE_P(Models, FullPerplexity, ::testing::Values("tiny-llama", "tiny-qwen2"),
                         [](const auto& info) {
                           std::string n = info.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

// Issue 3: `tm-eval ppl -f eval.txt` tokenizes with the workspace's own tokenizer and prints the
// same perplexity as the reference ids.
TEST(TextInput, PerplexityFromTextEqualsFromTokens) {
  const fs::path ws = workspace("tiny-llama", 1);
  const std::string cmd = test::tool("tm-eval") + " ppl -q -c 256 -m " + test::q(ws);
  const auto from_text = test::run(cmd + " -f " + test::q(test::shared_dir() / "data" / "eval.txt"));
  const auto from_ids = test::run(cmd + " --tokens " + test::q(test::reference_dir("tiny-llama") / "eval.tokens.i32"));
  ASSERT_EQ(from_text.code, 0) << from_text.err;
  ASSERT_EQ(from_ids.code, 0) << from_ids.err;
  auto ppl_line = [](const std::string& s) { return s.substr(0, s.find("scored tokens")); };  // seconds differ
  EXPECT_EQ(ppl_line(from_text.out), ppl_line(from_ids.out));
  EXPECT_NE(from_text.out.find("PPL = 54.55"), std::string::npos) << from_text.out;
}

// small-llama: the oracle's ppl over the first 16 chunks is the same whether the workspace was
// split for tp 1 or tp 2 (merged ranks give bitwise-identical weights).
TEST(SmallLlama, Tp2PerplexityEqualsTp1) {
  const json ref = reference("small-llama");
  const int64_t ctx = ref["eval_ctx"];
  const CpuModel m1(load_workspace(workspace("small-llama", 1)));
  const CpuModel m2(load_workspace(workspace("small-llama", 2)));
  const auto ids = eval_tokens("small-llama", m1.config().vocab_size);
  auto f1 = score_from_logits([&](const int32_t* t, int64_t T) { return m1.forward(t, T); });
  auto f2 = score_from_logits([&](const int32_t* t, int64_t T) { return m2.forward(t, T); });
  const PplResult a = perplexity(f1, ids, ctx, 16, 2), b = perplexity(f2, ids, ctx, 16, 2);
  EXPECT_EQ(a.chunks, 16);
  EXPECT_EQ(a.tokens, 16 * (ctx - 1));
  EXPECT_LE(std::abs(a.ppl / b.ppl - 1.0), 1e-5) << a.ppl << " vs " << b.ppl;
  // The thread count does not change the result.
  EXPECT_EQ(perplexity(f1, ids, ctx, 4, 1).ppl, perplexity(f1, ids, ctx, 4, 2).ppl);
}

TEST(Perplexity, ProtocolOnAKnownDistribution) {
  // A "model" that always predicts uniform logits over V tokens has ppl exactly V.
  const int64_t V = 37;
  std::vector<int32_t> ids(1000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(i % V);
  auto uniform = score_from_logits([&](const int32_t*, int64_t T) { return Mat(Mat::Zero(T, V)); });
  const PplResult r = perplexity(uniform, ids, 100, 0, 2);
  EXPECT_EQ(r.chunks, 10);
  EXPECT_EQ(r.tokens, 990);
  EXPECT_NEAR(r.ppl, double(V), 1e-9);
  EXPECT_NEAR(r.ppl_error, 0.0, 1e-6);  // every NLL is log(V): zero spread up to rounding
  EXPECT_THROW(perplexity(uniform, ids, 2000, 0, 1), Error);
}

// Batches of chunks (tm-eval ppl -b): the scorer sees `batch` contiguous chunks at a time (the last
// batch the rest), the result is the one of scoring chunk by chunk, and progress stays per chunk.
TEST(Perplexity, BatchedEqualsOneByOne) {
  std::vector<int32_t> ids(1050);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t((i * 7919) % 101);
  // A deterministic per-chunk "NLL" that depends on every token of the chunk.
  auto one = [](const int32_t* t, int64_t T, double* s, double* s2) {
    *s = *s2 = 0;
    for (int64_t i = 1; i < T; ++i) {
      const double nll = 0.01 * double(t[i] + t[i - 1] % 7);
      *s += nll;
      *s2 += nll * nll;
    }
  };
  const PplResult want = perplexity(one, ids, 100, 0, 1);
  for (int64_t batch : {1, 3, 4, 10, 64}) {
    std::vector<int64_t> counts, done_seen;
    auto batched = [&](const int32_t* t, int64_t count, int64_t T, double* s, double* s2) {
      EXPECT_EQ((t - ids.data()) % T, 0);
      counts.push_back(count);
      for (int64_t i = 0; i < count; ++i) one(t + i * T, T, s + i, s2 + i);
    };
    const PplResult got =
        perplexity_batched(batched, batch, ids, 100, 0, 1, [&](int64_t d, int64_t, double) { done_seen.push_back(d); });
    EXPECT_EQ(got.ppl, want.ppl) << "batch " << batch;
    EXPECT_EQ(got.ppl_error, want.ppl_error) << "batch " << batch;
    EXPECT_EQ(got.tokens, want.tokens);
    EXPECT_EQ(counts.size(), size_t((10 + batch - 1) / batch)) << "batch " << batch;
    EXPECT_EQ(counts.back(), 10 - batch * (int64_t(counts.size()) - 1));
    ASSERT_EQ(done_seen.size(), 10u);
    for (size_t i = 0; i < done_seen.size(); ++i) EXPECT_EQ(done_seen[i], int64_t(i + 1));
  }
  EXPECT_THROW(perplexity_batched([](const int32_t*, int64_t, int64_t, double*, double*) {}, 0, ids, 100, 0, 1), Error);
}

// `tm-eval ppl -b` on the CPU groups chunks only: the same report as -b 1.
TEST(TextInput, PplBatchFlagKeepsTheResult) {
  const fs::path ws = workspace("tiny-llama", 1);
  const std::string cmd = test::tool("tm-eval") + " ppl -q --device cpu -c 64 --chunks 7 -t 2 -m " + test::q(ws) +
                          " --tokens " + test::q(test::reference_dir("tiny-llama") / "eval.tokens.i32");
  const auto one = test::run(cmd + " -b 1"), three = test::run(cmd + " -b 3");
  ASSERT_EQ(one.code, 0) << one.err;
  ASSERT_EQ(three.code, 0) << three.err;
  auto ppl_line = [](const std::string& s) { return s.substr(0, s.find("scored tokens")); };  // seconds differ
  EXPECT_EQ(ppl_line(three.out), ppl_line(one.out));
  EXPECT_NE(test::run(cmd + " -b 0").code, 0);
}

// The oracle stores K and V as the KV cache would: fp16 mode rounds them to fp16 (TurboMind's
// cache is fp16), int8/int4 quantize them; kv_cache_roundtrip is that rounding.
TEST(KvCache, RoundtripIsTheCacheFormat) {
  std::vector<float> x(64);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(float(i) * 0.37f) * 3.1f + 1e-3f * float(i);
  std::vector<float> fp16 = x, int8 = x, fq8 = x;
  kv_cache_roundtrip(fp16.data(), int(fp16.size()), KvMode::kFp16);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(fp16[i], half_to_float(float_to_half(x[i])));
  EXPECT_NE(fp16, x);  // these values are not all fp16-exact: the rounding is real
  kv_cache_roundtrip(int8.data(), int(int8.size()), KvMode::kInt8);
  kv_fake_quant(fq8.data(), int(fq8.size()), 8);
  EXPECT_EQ(int8, fq8);
}

// RTN W4 g128 int4 workspaces (all decoder linears), scored by the CPU oracle, against the
// reference's ppl_rtn_w4g128_fp16 (PyTorch, fp16) within 0.3%.
class RtnPerplexity : public ::testing::TestWithParam<std::string> {};

TEST_P(RtnPerplexity, MatchesReference) {
  const std::string model = GetParam();
  const json ref = reference(model);
  test::TempDir tmp;
  const RtnReport rep = quantize_workspace_rtn(workspace(model, 1), tmp / "int4", 128, false);
  EXPECT_EQ(rep.linears, 5 * load_tm_config(tmp / "int4").num_layer);
  EXPECT_EQ(load_tm_config(tmp / "int4").weight_type, "int4");
  const CpuModel m(load_workspace(tmp / "int4"));
  const auto ids = eval_tokens(model, m.config().vocab_size);
  const PplResult r = perplexity(score_from_logits([&](const int32_t* t, int64_t T) { return m.forward(t, T); }), ids,
                                 ref["eval_ctx"].get<int64_t>(), 0, 2);
  const double want = ref["ppl_rtn_w4g128_fp16"];
  EXPECT_LE(std::abs(r.ppl / want - 1.0), 3e-3) << model << ": RTN ppl " << r.ppl << " vs reference " << want;
  RecordProperty("ppl", std::to_string(r.ppl));
}

INSTANTIATE_TEST_SUITE_P(Models, RtnPerplexity, ::testing::Values("tiny-llama", "tiny-qwen2"), [](const auto& info) {
  std::string n = info.param;
  std::replace(n.begin(), n.end(), '-', '_');
  return n;
});

TEST(Int4, PackingRoundTripAndGuards) {
  // Codes land at bits 4j of word w for column 8w + j; dequantization is (q - zero) * scale.
  std::vector<float> w(128 * 16);
  for (size_t i = 0; i < w.size(); ++i) w[i] = float(int(i * 7919 % 257) - 128) / 100.0f;
  const Int4Linear q = quantize_rtn(w.data(), 128, 16, 128);
  const std::vector<float> back = dequantize(q);
  for (int64_t n = 0; n < 16; ++n) {
    const float scale = half_to_float(q.scales[size_t(n)]);
    for (int64_t k = 0; k < 128; ++k) EXPECT_LE(std::abs(back[size_t(k * 16 + n)] - w[size_t(k * 16 + n)]), 0.51f * scale + 1e-3f);
  }
  EXPECT_EQ(int4_code(q, 5, 9), (uint32_t(q.qweight[5 * 2 + 1]) >> 4) & 0xf);
  // A constant positive group collapses as the reference's does: q = 15, zero = 0, w ~ +1e-5.
  std::vector<float> c(128 * 8, 0.5f);
  const Int4Linear qc = quantize_rtn(c.data(), 128, 8, 128);
  EXPECT_EQ(int4_code(qc, 0, 0), 15);
  EXPECT_EQ(half_to_float(qc.zeros[0]), 0.0f);
  EXPECT_THROW(quantize_rtn(c.data(), 100, 8, 128), Error);
}
