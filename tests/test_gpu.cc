// The CUDA runtime against the golden files and the CPU oracle (ctest label `gpu`; every test
// skips when no CUDA device is present).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cuda_runtime.h>

#include "cpu_forward.h"
#include "gpu_model.h"
#include "hf2tm.h"
#include "perplexity.h"
#include "test_util.h"

using namespace tmkit;
using json = nlohmann::json;

namespace {

fs::path workspace(const std::string& model) {
  static test::TempDir root;
  const fs::path ws = root / model;
  if (!fs::exists(ws)) {
    Hf2TmOptions o;
    o.src = test::model_dir(model);
    o.dst = ws;
    convert_hf_to_tm(o);
  }
  return ws;
}

std::vector<float> as_vector(const Mat& m) { return std::vector<float>(m.data(), m.data() + m.size()); }

class Gpu : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  }
};

}  // namespace

TEST_P(Gpu, Logits64MatchReferenceAndOracle) {
  const std::string model = GetParam();
  const ModelWeights w = load_workspace(workspace(model));
  GpuModel gpu(w);
  const CpuModel cpu(w);
  const auto ids = read_tokens(test::reference_dir(model) / "eval.tokens.i32", w.cfg.vocab_size);
  const Mat g = gpu.forward(ids.data(), 64);
  const auto ref = test::read_array<float>(test::reference_dir(model) / "logits64.f32");
  const double vs_ref = test::rel_l2(as_vector(g), ref), vs_cpu = test::rel_l2(as_vector(g), as_vector(cpu.forward(ids.data(), 64)));
  std::printf("%s on %s: logits64 rel-L2 vs reference %.3g, vs CPU oracle %.3g\n", model.c_str(), gpu.device_name().c_str(),
              vs_ref, vs_cpu);
  EXPECT_LE(vs_ref, 2e-3);
  EXPECT_LE(vs_cpu, 2e-3);
  // A second, longer sequence exercises several key tiles and the causal mask across tiles.
  const Mat g2 = gpu.forward(ids.data() + 1000, 200), c2 = cpu.forward(ids.data() + 1000, 200);
  EXPECT_LE(test::rel_l2(as_vector(g2), as_vector(c2)), 2e-3);
}

TEST_P(Gpu, FullEvalPerplexity) {
  const std::string model = GetParam();
  const json ref = json::parse(test::slurp(test::reference_dir(model) / "reference.json"));
  const ModelWeights w = load_workspace(workspace(model));
  GpuModel gpu(w);
  const auto ids = read_tokens(test::reference_dir(model) / "eval.tokens.i32", w.cfg.vocab_size);
  auto score = [&](const int32_t* t, int64_t T, double* s, double* s2) { gpu.nll_sums(t, T, s, s2); };
  const PplResult r = perplexity(score, ids, ref["eval_ctx"].get<int64_t>(), 0, 1);
  const double want = ref["ppl_fp16"];
  std::printf("%s: GPU ppl %.4f (reference ppl_fp16 %.4f, %+.4f%%), %lld chunks in %.2f s\n", model.c_str(), r.ppl, want,
              100 * (r.ppl / want - 1), (long long)r.chunks, r.seconds);
  EXPECT_EQ(r.tokens, ref["scored_tokens"].get<int64_t>());
  EXPECT_LE(std::abs(r.ppl / want - 1.0), 1e-3);
}

INSTANTIATE_TEST_SUITE_P(Models, Gpu, ::testing::Values("tiny-llama", "tiny-qwen2", "small-llama"), [](const auto& info) {
  std::string n = info.param;
  std::replace(n.begin(), n.end(), '-', '_');
  return n;
});

// Attention at ctx 4096 keeps no [T, T] matrix: device memory grows by far less than one fp32
// [H, T, T] score tensor (512 MiB for small-llama), and the output is finite.
TEST(GpuMemory, Ctx4096WithoutScoreMatrix) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  const ModelWeights w = load_workspace(workspace("small-llama"));
  GpuModel gpu(w);
  const auto ids = read_tokens(test::reference_dir("small-llama") / "eval.tokens.i32", w.cfg.vocab_size);
  size_t free_before = 0, free_after = 0, total = 0;
  gpu.forward(ids.data(), 16);  // handles and first buffers
  ASSERT_EQ(cudaMemGetInfo(&free_before, &total), cudaSuccess);
  const int64_t T = 4096;
  const Mat logits = gpu.forward(ids.data(), T);
  ASSERT_EQ(cudaMemGetInfo(&free_after, &total), cudaSuccess);
  const double grown = double(free_before) - double(free_after);
  const double scores = double(w.cfg.head_num) * T * T * 4;
  std::printf("ctx %lld: device memory grew %.1f MiB; one [H, T, T] fp32 score tensor would be %.1f MiB\n", (long long)T,
              grown / (1 << 20), scores / (1 << 20));
  EXPECT_LT(grown, 0.5 * scores);
  EXPECT_TRUE(logits.allFinite());
}
