// kv-calibrate on the GPU: the device's KV statistics and static KV format against the CPU
// oracle's (tiny-qwen2: q/k/v biases, 2 kv heads). Skips without a CUDA device.
#include <algorithm>
#include <cmath>

#include "cpu_forward.h"
#include "gpu_model.h"
#include "hf2tm.h"
#include "kv_calibrate.h"
#include "perplexity.h"
#include "test_util.h"

namespace tmkit {
namespace {

struct Fixture {
  test::TempDir tmp;
  ModelWeights w;
  std::vector<int32_t> calib, eval;
  Fixture() {
    Hf2TmOptions o;
    o.src = test::model_dir("tiny-qwen2");
    o.dst = tmp / "ws";
    convert_hf_to_tm(o);
    w = load_workspace(tmp / "ws");
    calib = read_tokens(test::reference_dir("tiny-qwen2") / "calib.tokens.i32", w.cfg.vocab_size);
    calib.resize(4 * 256);
    eval = read_tokens(test::reference_dir("tiny-qwen2") / "eval.tokens.i32", w.cfg.vocab_size);
  }
};

TEST(KvCalibrateGpu, StatisticsMatchTheOracle) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  Fixture f;
  const KvStats cpu = kv_stats_cpu(CpuModel(f.w), f.calib, 4, 256, 2);
  const KvStats gpu = kv_stats_gpu(f.w, f.calib, 4, 256, 2);
  EXPECT_EQ(gpu.tokens, cpu.tokens);
  double worst = 0;
  for (size_t li = 0; li < cpu.layers.size(); ++li)
    for (int t = KvStats::kK; t <= KvStats::kV; ++t) {
      const auto& ab = cpu.layers[li].at(KvStats::Tensor(t), KvStats::kAbsmax);
      const float peak = *std::max_element(ab.begin(), ab.end());
      for (int st = 0; st < 3; ++st) {
        const auto& a = cpu.layers[li].s[size_t(3 * t + st)];
        const auto& b = gpu.layers[li].s[size_t(3 * t + st)];
        for (size_t c = 0; c < a.size(); ++c) worst = std::max(worst, double(std::abs(a[c] - b[c]) / peak));
      }
    }
  std::printf("KV statistics, GPU vs CPU: worst difference %.2e of the tensor's absmax\n", worst);
  EXPECT_LT(worst, 2e-2);  // fp16 GEMM inputs on the GPU, fp32 on the CPU
}

TEST(KvCalibrateGpu, StaticScalesPerplexityMatchesTheOracle) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  Fixture f;
  const KvStats stats = kv_stats_cpu(CpuModel(f.w), f.calib, 4, 256, 2);
  for (KvMode mode : {KvMode::kInt8, KvMode::kInt4}) {
    KvQuant kv(mode);
    kv.layers = kv_static_params(stats, kv.bits());
    const CpuModel cpu(f.w, kv);
    GpuModel gpu(f.w, kv);
    const double pc = perplexity(score_from_logits([&](const int32_t* t, int64_t T) { return cpu.forward(t, T); }), f.eval,
                                 256, 8, 2).ppl;
    const double pg = perplexity([&](const int32_t* t, int64_t T, double* s, double* s2) { gpu.nll_sums(t, T, s, s2); },
                                 f.eval, 256, 8, 1).ppl;
    std::printf("tiny-qwen2 %s static: ppl GPU %.4f CPU %.4f\n", kv_mode_name(mode), pg, pc);
    EXPECT_LT(std::abs(pg / pc - 1), 3e-3);
    EXPECT_NE(test::error_of([&] { gpu.reset(64, 1); }).find("static"), std::string::npos);
  }
}

}  // namespace
}  // namespace tmkit
