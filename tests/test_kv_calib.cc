// kv-calibrate: statistics, static scales, legacy files, workspace handling (atomic, in place,
// byte-identical reruns), tm-shard of calibrated workspaces, and the static KV format in the CPU
// oracle. CPU only (small calibration on tiny-qwen2, which has q/k/v biases and 2 kv heads).
#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "cpu_forward.h"
#include "kv_quant.h"
#include "kv_stats.h"
#include "perplexity.h"
#include "test_util.h"

namespace tmkit {
namespace {

using test::files_of;

namespace fs = std::filesystem;

const std::string kCalib = " --calib-samples 4 --calib-seqlen 256 --device cpu -q";

std::string calib_ids() { return test::q(test::reference_dir("tiny-qwen2") / "calib.tokens.i32"); }

test::RunResult calibrate(const std::string& args) {
  return test::run(test::tool("kv-calibrate") + " " + args + " --calib-dataset " + calib_ids() + kCalib);
}

fs::path calibrated(const fs::path& dst, const std::string& extra = "") {
  const auto r = calibrate(test::q(test::model_dir("tiny-qwen2")) + " --dst-path " + test::q(dst) + extra);
  if (r.code != 0) throw std::runtime_error("kv-calibrate failed: " + r.err);
  return dst;
}

std::vector<float> floats(const fs::path& p) { return test::read_array<float>(p); }

TEST(KvStats, ObserveFoldsMinMaxAbsmaxPerChannel) {
  KvStats s(1, 1, 2);
  const float kr[] = {1, -2, 3, 0.5f}, k[] = {-1, 4, 2, -8}, v[] = {0, 0, -3, 1};  // 2 rows x 2 channels
  s.observe(0, 2, kr, k, v, 2);
  const auto& l = s.layers[0];
  EXPECT_EQ(l.at(KvStats::kK, KvStats::kMin), (std::vector<float>{-1, -8}));
  EXPECT_EQ(l.at(KvStats::kK, KvStats::kMax), (std::vector<float>{2, 4}));
  EXPECT_EQ(l.at(KvStats::kK, KvStats::kAbsmax), (std::vector<float>{2, 8}));
  EXPECT_EQ(l.at(KvStats::kKPreRope, KvStats::kMin), (std::vector<float>{1, -2}));
  EXPECT_EQ(l.at(KvStats::kV, KvStats::kAbsmax), (std::vector<float>{3, 1}));
  EXPECT_EQ(s.tokens, 2);
  const auto p = kv_static_params(s, 8);
  EXPECT_FLOAT_EQ(p[0].k_scale[0], 2.0f / 255);  // pre-RoPE K: [1, 3]
  EXPECT_FLOAT_EQ(p[0].k_zero[0], 1.0f);
  EXPECT_FLOAT_EQ(p[0].v_scale[1], 1.0f / 255);  // V channel 1: [0, 1]
  const auto legacy = legacy_kv_scale(s, 0, 0, 1, 8);  // post-RoPE K over both channels: [-8, 4]
  EXPECT_FLOAT_EQ(legacy[0], 12.0f / 255);
  EXPECT_FLOAT_EQ(legacy[1], -2.0f);
}

// int4 ranges: a channel of 1000 values spread over [0, 1] and one outlier at 3 gets a range that
// clips the outlier (the best of the searched ranges: [0.06, 2.31], 2.26 against min/max's 3.33,
// numpy), and a uniform channel keeps its range but half a code at each end ([-1, 1] -> +-0.94).
TEST(KvStats, Int4RangesClipOutliersWhereThatLowersTheError) {
  KvStats s(1, 1, 2);
  std::vector<float> kr, v;
  for (int i = 0; i < 1000; ++i) {
    const float x = float(i) / 999;
    kr.insert(kr.end(), {x, 2 * x - 1});  // channel 0: [0, 1]; channel 1: [-1, 1]
    v.insert(v.end(), {x, -x});
  }
  kr.insert(kr.end(), {3.0f, 0.0f});
  v.insert(v.end(), {0.5f, 0.0f});
  const int64_t rows = int64_t(kr.size() / 2);
  s.observe(0, rows, kr.data(), kr.data(), v.data(), 2);
  KvHistograms h(s);
  h.observe(0, rows, kr.data(), v.data(), 2);
  uint64_t counted = 0;
  for (uint64_t c : h.layers[0].counts) counted += c;
  EXPECT_EQ(counted, uint64_t(4 * rows));
  EXPECT_THROW(kv_static_params(s, 4), Error);  // no ranges yet
  kv_int4_ranges(h, &s);
  const auto& r = s.layers[0].int4;
  EXPECT_NEAR(r[1][0], 2.31f, 0.1f);  // K channel 0 clipped
  EXPECT_NEAR(r[0][1], -0.94f, 0.021f);  // K channel 1
  EXPECT_NEAR(r[1][1], 0.94f, 0.021f);
  auto sq_error = [&](float lo, float hi) {
    double e = 0;
    for (int64_t t = 0; t < rows; ++t) {
      float x = kr[size_t(2 * t)];
      const float scale = (hi - lo) / 15, zero = lo;
      kv_static_fake_quant(&x, 1, &scale, &zero, 4);
      e += double(x - kr[size_t(2 * t)]) * double(x - kr[size_t(2 * t)]);
    }
    return e;
  };
  EXPECT_LT(sq_error(r[0][0], r[1][0]), 0.7 * sq_error(0.0f, 3.0f));
  const auto p = kv_static_params(s, 4);
  EXPECT_FLOAT_EQ(p[0].k_scale[0], (r[1][0] - r[0][0]) / 15);
  EXPECT_FLOAT_EQ(p[0].v_zero[1], r[2][1]);
  // Merging drops the ranges (they belong to the histograms of one set of statistics).
  KvStats m = s;
  m.merge(s);
  EXPECT_TRUE(m.layers[0].int4[0].empty());
}

// The files agree with the statistics they derive from, and the statistics bound what the oracle
// computes on the calibration blocks (checked independently through its observer).
TEST(KvCalibrate, WritesStatisticsStaticScalesAndLegacyFiles) {
  test::TempDir tmp;
  const fs::path ws = calibrated(tmp / "ws", " --tp 2 --kv-bits 4");
  const TmConfig cfg = load_tm_config(ws);
  EXPECT_EQ(cfg.kv_calib_bits, 4);
  EXPECT_EQ(cfg.kv_calib_samples, 4);
  EXPECT_EQ(cfg.tp, 2);
  const fs::path w = weights_dir(ws);
  const KvStats stats = read_kv_stats(w / kKvStatsFile, cfg);
  EXPECT_EQ(stats.tokens, 4 * 256);
  const int64_t n = cfg.kv_head_num * cfg.size_per_head, half = n / 2;
  for (int bits : {8, 4}) {
    const auto params = kv_static_params(stats, bits);
    for (int64_t li = 0; li < cfg.num_layer; ++li)
      for (int64_t r = 0; r < 2; ++r) {
        const auto f = floats(w / kv_static_file(li, bits, r));
        ASSERT_EQ(int64_t(f.size()), 4 * half);
        const auto& p = params[size_t(li)];
        for (int64_t c = 0; c < half; ++c) {
          ASSERT_EQ(f[size_t(c)], p.k_scale[size_t(r * half + c)]);
          ASSERT_EQ(f[size_t(3 * half + c)], p.v_zero[size_t(r * half + c)]);
        }
      }
  }
  for (int64_t li = 0; li < cfg.num_layer; ++li)
    for (int64_t r = 0; r < 2; ++r) {
      const auto f = floats(w / past_kv_scale_file(li, r));
      const auto want = legacy_kv_scale(stats, li, r, 2, 4);
      ASSERT_EQ(f, std::vector<float>(want.begin(), want.end()));
    }
  // Independently of KvStats: the oracle's extremes of layer 1 over the 4 calibration blocks.
  CpuModel model(load_workspace(ws));
  const auto ids = read_tokens(test::reference_dir("tiny-qwen2") / "calib.tokens.i32", cfg.vocab_size);
  float vmax = -INFINITY, kmin = INFINITY;
  const KvObserver obs = [&](int64_t layer, const Mat& kr, const Mat&, const Mat& v) {
    if (layer == 1) vmax = std::max(vmax, v.maxCoeff()), kmin = std::min(kmin, kr.minCoeff());
  };
  for (int b = 0; b < 4; ++b) model.forward(ids.data() + b * 256, 256, &obs);
  const auto& l1 = stats.layers[1];
  EXPECT_EQ(vmax, *std::max_element(l1.at(KvStats::kV, KvStats::kMax).begin(), l1.at(KvStats::kV, KvStats::kMax).end()));
  EXPECT_EQ(kmin, *std::min_element(l1.at(KvStats::kKPreRope, KvStats::kMin).begin(),
                                    l1.at(KvStats::kKPreRope, KvStats::kMin).end()));
}

TEST(KvCalibrate, RerunsAreByteIdenticalAndShardingEqualsCalibratingAtThatTp) {
  test::TempDir tmp;
  calibrated(tmp / "a");
  calibrated(tmp / "b");
  EXPECT_EQ(files_of(tmp / "a"), files_of(tmp / "b"));
  calibrated(tmp / "tp2", " --tp 2");
  const auto r = test::run(test::tool("tm-shard") + " " + test::q(tmp / "a") + " --tp 2 -q --dst-path " + test::q(tmp / "s2"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(files_of(tmp / "s2"), files_of(tmp / "tp2"));
  const auto back = test::run(test::tool("tm-shard") + " " + test::q(tmp / "s2") + " --tp 1 -q --dst-path " + test::q(tmp / "s1"));
  ASSERT_EQ(back.code, 0) << back.err;
  EXPECT_EQ(files_of(tmp / "s1"), files_of(tmp / "a"));
}

// A workspace is calibrated in place; a failing run leaves it as it was, with nothing beside it.
TEST(KvCalibrate, InPlaceAndAtomic) {
  test::TempDir tmp;
  const auto conv = test::run(test::tool("hf2tm") + " " + test::q(test::model_dir("tiny-qwen2")) + " -q --dst-path " +
                              test::q(tmp / "ws"));
  ASSERT_EQ(conv.code, 0) << conv.err;
  const auto before = files_of(tmp / "ws");
  const auto bad = test::run(test::tool("kv-calibrate") + " " + test::q(tmp / "ws") + " --calib-dataset " +
                             test::q(tmp / "missing.txt") + kCalib);
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.err.find("missing.txt"), std::string::npos) << bad.err;
  EXPECT_EQ(files_of(tmp / "ws"), before);
  const auto too_long = calibrate(test::q(tmp / "ws") + " --calib-seqlen 100000");
  EXPECT_NE(too_long.code, 0);
  EXPECT_EQ(files_of(tmp / "ws"), before);
  ASSERT_EQ(calibrate(test::q(tmp / "ws")).code, 0);
  const auto after = files_of(tmp / "ws");
  EXPECT_EQ(after.size(), before.size() + 1 + 3 * 2);  // stats, and per layer kv_int8, kv_int4, past_kv_scale
  for (const auto& [name, bytes] : before)
    if (name.find("config.yaml") == std::string::npos) {
      EXPECT_EQ(after.at(name), bytes) << name;
    }
  EXPECT_EQ(files_of(tmp / "ws"), files_of(calibrated(tmp / "fresh")));  // the same as converting + calibrating
  std::set<std::string> entries;
  for (const auto& e : fs::directory_iterator(tmp.path())) entries.insert(e.path().filename().string());
  EXPECT_EQ(entries, (std::set<std::string>{"ws", "fresh"}));
}

TEST(KvCalibrate, BadInputsFailNamingTheProblem) {
  test::TempDir tmp;
  fs::create_directories(tmp / "plain");
  auto r = calibrate(test::q(test::model_dir("tiny-qwen2")) + " --dst-path " + test::q(tmp / "plain"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("--dst-path"), std::string::npos) << r.err;
  r = calibrate(test::q(test::model_dir("tiny-qwen2")));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("--dst-path"), std::string::npos) << r.err;
  r = calibrate(test::q(tmp / "plain") + " --dst-path " + test::q(tmp / "x"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("config.json"), std::string::npos) << r.err;

  // One block of 380000 tokens would hold [T, T] attention scores (~540 GiB) in the CPU oracle:
  // refused before any work, naming the flag.
  r = test::run(test::tool("kv-calibrate") + " " + test::q(test::model_dir("tiny-qwen2")) + " --dst-path " +
                test::q(tmp / "long") + " --calib-dataset " + calib_ids() + " --calib-samples 1 --calib-seqlen 380000 --device cpu -q");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("--calib-seqlen 380000: the CPU oracle needs about"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(tmp / "long"));

  const fs::path ws = calibrated(tmp / "ws");
  const TmConfig cfg = load_tm_config(ws);
  EXPECT_NE(test::error_of([&] { load_kv_quant(ws, cfg, KvMode::kFp16, true); }).find("int8 or int4"), std::string::npos);
  const fs::path f = weights_dir(ws) / kv_static_file(1, 4, 0);
  fs::resize_file(f, 12);
  EXPECT_NE(test::error_of([&] { load_kv_quant(ws, cfg, KvMode::kInt4, true); }).find(f.string()), std::string::npos);
  fs::remove(f);
  EXPECT_NE(test::error_of([&] { load_kv_quant(ws, cfg, KvMode::kInt4, true); }).find("missing"), std::string::npos);
  const auto shard = test::run(test::tool("tm-shard") + " " + test::q(ws) + " --tp 2 -q --dst-path " + test::q(tmp / "s2"));
  EXPECT_NE(shard.code, 0);
  EXPECT_NE(shard.err.find(f.filename().string()), std::string::npos) << shard.err;
  EXPECT_FALSE(fs::exists(tmp / "s2"));

  const auto conv = test::run(test::tool("hf2tm") + " " + test::q(test::model_dir("tiny-qwen2")) + " -q --dst-path " +
                              test::q(tmp / "plain_ws"));
  ASSERT_EQ(conv.code, 0);
  EXPECT_NE(test::error_of([&] { load_kv_quant(tmp / "plain_ws", load_tm_config(tmp / "plain_ws"), KvMode::kInt8, true); })
                .find("kv-calibrate"),
            std::string::npos);
}

// The static format in the oracle: int8 costs (almost) nothing, int4 stays close to the online
// per-token scheme. tiny-qwen2, 8 chunks of 256 eval tokens, calibrated on 4 x 256 other tokens.
TEST(KvCalibrate, StaticScalesInTheOracle) {
  test::TempDir tmp;
  const fs::path ws = calibrated(tmp / "ws");
  const ModelWeights w = load_workspace(ws);
  const auto eval = read_tokens(test::reference_dir("tiny-qwen2") / "eval.tokens.i32", w.cfg.vocab_size);
  auto ppl = [&](KvMode mode, bool stat) {
    const CpuModel m(w, load_kv_quant(ws, w.cfg, mode, stat));
    return perplexity(score_from_logits([&](const int32_t* t, int64_t T) { return m.forward(t, T); }), eval, 256, 8, 2).ppl;
  };
  const double fp16 = ppl(KvMode::kFp16, false), int8s = ppl(KvMode::kInt8, true);
  const double int4d = ppl(KvMode::kInt4, false), int4s = ppl(KvMode::kInt4, true);
  std::printf("tiny-qwen2 ppl fp16 %.4f | int8 static %.4f | int4 dynamic %.4f static %.4f\n", fp16, int8s, int4d, int4s);
  EXPECT_LT(std::abs(int8s / fp16 - 1), 0.005);
  EXPECT_LT(int4s / fp16 - 1, 0.05);
  EXPECT_NE(int4s, int4d);
}

}  // namespace
}  // namespace tmkit
