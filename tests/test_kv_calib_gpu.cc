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
  // The int4 ranges (pass two's histograms). The squared error is flat near its minimum, so a few
  // values that fp16 rounding moves across a bin edge can move a channel's optimum by several
  // 1% steps (measured: worst 7.0e-2 of the range over 1024 tokens); on average the ends agree.
  double worst_range = 0, sum_range = 0;
  size_t ends = 0;
  for (size_t li = 0; li < cpu.layers.size(); ++li)
    for (int w = 0; w < 2; ++w) {
      const KvStats::Tensor t = w ? KvStats::kV : KvStats::kKPreRope;
      const auto& lo = cpu.layers[li].at(t, KvStats::kMin);
      const auto& hi = cpu.layers[li].at(t, KvStats::kMax);
      for (int end = 0; end < 2; ++end)
        for (size_t c = 0; c < lo.size(); ++c) {
          const double d = std::abs(cpu.layers[li].int4[size_t(2 * w + end)][c] - gpu.layers[li].int4[size_t(2 * w + end)][c]) /
                           std::max(1e-6f, hi[c] - lo[c]);
          worst_range = std::max(worst_range, d);
          sum_range += d;
          ++ends;
        }
    }
  std::printf("int4 ranges, GPU vs CPU: mean difference %.2e, worst %.2e of the channel's range\n", sum_range / double(ends),
              worst_range);
  EXPECT_LT(sum_range / double(ends), 1e-2);
  EXPECT_LT(worst_range, 0.15);
  // Counting on the device over the oracle's ranges: every row lands in exactly one bin of every
  // channel, and the histograms agree with the oracle's up to values near a bin edge.
  KvHistograms hist(cpu), ref(cpu);
  GpuModel model(f.w);
  for (int b = 0; b < 4; ++b) model.kv_histograms(f.calib.data() + b * 256, 1, 256, &hist);
  const CpuModel oracle(f.w);
  for (int b = 0; b < 4; ++b) {
    const KvObserver obs = [&](int64_t layer, const Mat& kr, const Mat&, const Mat& v) {
      ref.observe(layer, kr.rows(), kr.data(), v.data(), kr.cols());
    };
    oracle.forward(f.calib.data() + b * 256, 256, &obs);
  }
  uint64_t moved = 0, total = 0;
  for (size_t li = 0; li < hist.layers.size(); ++li)
    for (size_t ch = 0; ch < size_t(2 * hist.channels); ++ch) {
      uint64_t sum = 0;
      for (int j = 0; j < KvHistograms::kBins; ++j) {
        const uint64_t a = hist.layers[li].counts[ch * KvHistograms::kBins + size_t(j)];
        const uint64_t r = ref.layers[li].counts[ch * KvHistograms::kBins + size_t(j)];
        sum += a;
        moved += a > r ? a - r : r - a;
      }
      EXPECT_EQ(sum, 1024u);
      total += sum;
    }
  std::printf("KV histograms, GPU vs CPU: %.2e of the counts in another bin\n", double(moved) / 2 / double(total));
  EXPECT_LT(double(moved) / 2 / double(total), 0.05);
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
