// tm-shard: re-split workspaces must equal hf2tm's conversion at the new tp byte for byte (every
// file: tensors, config.yaml, tokenizer), round trips must give the original back, and impossible
// or broken inputs must fail naming the reason and leave nothing behind.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "hf2tm.h"
#include "hf_awq.h"
#include "rtn.h"
#include "test_util.h"
#include "tm_shard.h"
#include "turbomind.h"

using namespace tmkit;

namespace {

using test::files_of;

fs::path hf2tm(const fs::path& model, const fs::path& dst, int64_t tp) {
  Hf2TmOptions o;
  o.src = model;
  o.dst = dst;
  o.tp = tp;
  convert_hf_to_tm(o);
  return dst;
}

fs::path shard(const fs::path& src, const fs::path& dst, int64_t tp, bool force = false) {
  TmShardOptions o;
  o.src = src;
  o.dst = dst;
  o.tp = tp;
  o.force = force;
  reshard_workspace(o);
  return dst;
}

void expect_same_workspace(const fs::path& got, const fs::path& want) {
  const auto a = files_of(got), b = files_of(want);
  std::vector<std::string> names_a, names_b;
  for (const auto& [name, _] : a) names_a.push_back(name);
  for (const auto& [name, _] : b) names_b.push_back(name);
  ASSERT_EQ(names_a, names_b) << got << " vs " << want;
  size_t differing = 0;
  for (const auto& [name, bytes] : b)
    if (a.at(name) != bytes && ++differing <= 5) ADD_FAILURE() << name << " differs: " << got << " vs " << want;
  EXPECT_EQ(differing, 0u) << got << " vs " << want;
  EXPECT_GT(b.size(), 10u);
}

// No file or hidden temporary sibling left in `dir` besides `keep`.
void expect_only(const fs::path& dir, const std::set<std::string>& keep) {
  std::set<std::string> present;
  for (const auto& e : fs::directory_iterator(dir)) present.insert(e.path().filename().string());
  EXPECT_EQ(present, keep) << dir;
}

std::string shard_error(const fs::path& src, const fs::path& dst, int64_t tp) {
  return test::error_of([&] { shard(src, dst, tp); });
}

// hf2tm of `model` at every tp in `tps`, into tmp/hf<tp>.
std::map<int64_t, fs::path> convert_all(const fs::path& model, const test::TempDir& tmp, std::vector<int64_t> tps) {
  std::map<int64_t, fs::path> out;
  for (int64_t tp : tps) out[tp] = hf2tm(model, tmp / ("hf" + std::to_string(tp)), tp);
  return out;
}

void run_tool(const std::string& args) {
  const auto r = test::run(args);
  ASSERT_EQ(r.code, 0) << args << "\n" << r.err;
}

}  // namespace

TEST(TmShard, TinyLlamaAndTinyQwen2RoundTrip1To2To1) {
  for (const std::string model : {"tiny-llama", "tiny-qwen2"}) {
    SCOPED_TRACE(model);
    test::TempDir tmp;
    auto hf = convert_all(test::model_dir(model), tmp, {1, 2});
    expect_same_workspace(shard(hf[1], tmp / "s2", 2), hf[2]);
    expect_same_workspace(shard(tmp / "s2", tmp / "s1", 1), hf[1]);
  }
}

TEST(TmShard, SmallLlamaRoundTrip1To4To2To1) {
  test::TempDir tmp;
  auto hf = convert_all(test::model_dir("small-llama"), tmp, {1, 2, 4});
  expect_same_workspace(shard(hf[1], tmp / "s4", 4), hf[4]);
  expect_same_workspace(shard(tmp / "s4", tmp / "s2", 2), hf[2]);
  expect_same_workspace(shard(tmp / "s2", tmp / "s1", 1), hf[1]);
  expect_same_workspace(shard(hf[2], tmp / "s2to4", 4), hf[4]);
}

// int4: qweight (8 columns a word), scales and zeros (a row per group of 128 input channels) move
// together. RTN quantizes every group of a column on its own, so quantizing hf2tm's tp=N workspace
// gives what re-splitting the quantized tp=1 workspace must give.
TEST(TmShard, Int4SmallLlamaRoundTripsAndEqualsQuantizedHf2tm) {
  test::TempDir tmp;
  auto hf = convert_all(test::model_dir("small-llama"), tmp, {1, 2, 4});
  for (int64_t tp : {1, 2, 4}) quantize_workspace_rtn(hf[tp], tmp / ("q" + std::to_string(tp)), 128, false);
  EXPECT_EQ(load_tm_config(tmp / "q1").weight_type, "int4");
  expect_same_workspace(shard(tmp / "q1", tmp / "s2", 2), tmp / "q2");
  expect_same_workspace(shard(tmp / "s2", tmp / "s4", 4), tmp / "q4");
  expect_same_workspace(shard(tmp / "s4", tmp / "s1", 1), tmp / "q1");
}

// Vocab rows pad to a multiple of tp and inter_size (fp: I padded to tp) follows the new tp:
// vocab 1022 and I = 90 become 1024 and 92 at tp 4, and come back.
TEST(TmShard, FpPaddingFollowsTheNewTp) {
  test::TempDir tmp;
  run_tool(test::tool("hf-synth") + " --out " + test::q(tmp / "synth") +
           " --hidden 64 --layers 2 --heads 4 --kv-heads 4 --inter 90 --vocab 1022 --dtype float16");
  auto hf = convert_all(tmp / "synth", tmp, {1, 2, 4});
  EXPECT_EQ(load_tm_config(hf[4]).inter_size, std::vector<int64_t>(2, 92));
  expect_same_workspace(shard(hf[1], tmp / "s4", 4), hf[4]);
  expect_same_workspace(shard(tmp / "s4", tmp / "s2", 2), hf[2]);
  expect_same_workspace(shard(tmp / "s4", tmp / "s1", 1), hf[1]);
  expect_same_workspace(shard(hf[2], tmp / "s2to4", 4), hf[4]);
}

// int4 inter_size pads to whole groups per rank (lmdeploy: ceil(ceil(I/128)/tp) * 128 * tp): I = 384
// is 3 groups, 512 at tp 2 with a zero group, which a merge back to tp 1 drops again.
TEST(TmShard, Int4InterPaddingFollowsTheNewTp) {
  test::TempDir tmp;
  run_tool(test::tool("hf-synth") + " --out " + test::q(tmp / "synth") +
           " --hidden 256 --layers 1 --heads 2 --kv-heads 2 --inter 384 --vocab 300 --dtype float16");
  write_hf_awq_rtn(tmp / "synth", tmp / "awq", 128, false);
  auto hf = convert_all(tmp / "awq", tmp, {1, 2});
  EXPECT_EQ(load_tm_config(hf[2]).inter_size, std::vector<int64_t>(1, 512));
  expect_same_workspace(shard(hf[1], tmp / "s2", 2), hf[2]);
  expect_same_workspace(shard(tmp / "s2", tmp / "s1", 1), hf[1]);
}

TEST(TmShard, ImpossibleSplitsFailNamingTheReasonAndLeaveNothing) {
  test::TempDir tmp;
  const fs::path llama = hf2tm(test::model_dir("tiny-llama"), tmp / "llama", 1);
  const fs::path qwen = hf2tm(test::model_dir("tiny-qwen2"), tmp / "qwen", 1);
  quantize_workspace_rtn(llama, tmp / "llama-int4", 128, false);
  std::string err = shard_error(llama, tmp / "out", 3);
  EXPECT_NE(err.find("--tp 3: head_num (attention heads) = 4 is not divisible"), std::string::npos) << err;
  err = shard_error(qwen, tmp / "out", 4);
  EXPECT_NE(err.find("--tp 4: kv_head_num (kv heads) = 2 is not divisible"), std::string::npos) << err;
  // hidden 128 = 4 heads x 32: wo's 64 input channels per rank at tp 2 would cut a group of 128.
  err = shard_error(tmp / "llama-int4", tmp / "out", 2);
  EXPECT_NE(err.find("layers.0.attention.wo.0.scales: --tp 2 leaves 64 input channels per rank, which cuts the int4 "
                     "quantization groups of 128"), std::string::npos) << err;
  expect_only(tmp.path(), {"llama", "qwen", "llama-int4"});
}

TEST(TmShard, BrokenSourcesFailNamingTheFile) {
  test::TempDir tmp;
  const fs::path good = hf2tm(test::model_dir("tiny-qwen2"), tmp / "good", 2);
  const fs::path ws = tmp / "ws", w = weights_dir(ws);
  const auto expect_failure = [&](const std::string& what, const std::function<void()>& breakage) {
    fs::remove_all(ws);
    fs::copy(good, ws, fs::copy_options::recursive);
    breakage();
    const std::string err = shard_error(ws, tmp / "out", 1);
    EXPECT_NE(err.find(what), std::string::npos) << err;
    expect_only(tmp.path(), {"good", "ws"});
  };
  const fs::path w2 = w / "layers.1.feed_forward.w2.1.weight";
  expect_failure(w2.string() + ": 98176 bytes, expected 49152 ([192, 128] x 2 B at tp 2)", [&] {
    std::ofstream(w2, std::ios::app) << std::string(49024, 'x');
  });
  expect_failure(w2.string() + ": 49151 bytes, expected 49152", [&] { fs::resize_file(w2, 49151); });
  expect_failure(w2.string() + ": missing tensor file", [&] { fs::remove(w2); });
  expect_failure((w / "layers.0.attention.w_qkv.1.bias").string() + ": missing tensor file",
                 [&] { fs::remove(w / "layers.0.attention.w_qkv.1.bias"); });
  expect_failure((w / "extra.weight").string() + ": not part of the TurboMind workspace layout",
                 [&] { write_file(w / "extra.weight", std::string(4, '\0')); });
  expect_failure((ws / "notes.txt").string() + ": not part of", [&] { write_file(ws / "notes.txt", "x"); });
  expect_failure("line 30 '  expert_num: [3]' would not carry over", [&] {
    std::string cfg = test::slurp(w / "config.yaml");
    cfg.replace(cfg.find("expert_num: []"), 14, "expert_num: [3]");
    fs::remove(w / "config.yaml");
    write_file(w / "config.yaml", cfg);
  });
  expect_failure("layers.1.attention.wo.1.bias: the replicated tensor differs from rank 0's", [&] {
    const fs::path bias = w / "layers.1.attention.wo.1.bias";
    std::string b = test::slurp(bias);
    b[0] ^= 1;
    fs::remove(bias);
    write_file(bias, b);
  });
  expect_failure("not a TurboMind workspace", [&] { fs::remove(w / "config.yaml"); });
}

TEST(TmShard, DestinationRules) {
  test::TempDir tmp;
  const fs::path ws = hf2tm(test::model_dir("tiny-llama"), tmp / "ws", 1);
  EXPECT_NE(shard_error(ws, ws / "inside", 2).find("is inside the source workspace"), std::string::npos);
  EXPECT_NE(shard_error(ws, ws, 2).find("is or contains the source"), std::string::npos);
  EXPECT_NE(shard_error(ws, tmp.path(), 2).find("is or contains the source"), std::string::npos);
  expect_only(tmp.path(), {"ws"});
  expect_only(ws, {"triton_models"});
  fs::create_directories(tmp / "taken");
  EXPECT_NE(shard_error(ws, tmp / "taken", 2).find("destination exists (use --force"), std::string::npos);
  EXPECT_TRUE(fs::is_empty(tmp / "taken"));
  shard(ws, tmp / "taken", 2, true);
  EXPECT_EQ(load_tm_config(tmp / "taken").tp, 2);
  expect_only(tmp.path(), {"ws", "taken"});
}

// past_kv_scale (spec §7.1): 4 x fp32 [k_scale, k_zp, v_scale, v_zp] per layer and rank. Ranks that
// split keep their source rank's range bit for bit; ranks that merge take the union of the ranges.
TEST(TmShard, PastKvScalesSplitAndMerge) {
  test::TempDir tmp;
  const fs::path ws = hf2tm(test::model_dir("tiny-llama"), tmp / "ws", 2);
  const auto kv = [](const fs::path& w, int i, int r) { return weights_dir(w) / fmt::format("layers.{}.past_kv_scale.{}.weight", i, r); };
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < 2; ++r) {  // rank r: k in [-1 - r, 2 + i], v in [-0.5, 0.25 * (1 + r)]
      const float klo = -1.0f - float(r), khi = 2.0f + float(i), vlo = -0.5f, vhi = 0.25f * float(1 + r);
      const float v[4] = {(khi - klo) / 255, (khi + klo) / 2, (vhi - vlo) / 255, (vhi + vlo) / 2};
      write_file(kv(ws, i, r), v, 16);
    }
  shard(ws, tmp / "tp1", 1);
  for (int i = 0; i < 4; ++i) {
    const auto v = test::read_array<float>(kv(tmp / "tp1", i, 0));
    ASSERT_EQ(v.size(), 4u);
    EXPECT_NEAR(v[0], (2.0f + float(i) + 2.0f) / 255, 1e-6) << i;
    EXPECT_NEAR(v[1], (2.0f + float(i) - 2.0f) / 2, 1e-5) << i;
    EXPECT_NEAR(v[2], 1.0 / 255, 1e-7) << i;
    EXPECT_NEAR(v[3], 0.0, 1e-6) << i;
  }
  // Split and merge back: bit-exact.
  shard(tmp / "tp1", tmp / "tp2", 2);
  for (int r = 0; r < 2; ++r) EXPECT_EQ(test::slurp(kv(tmp / "tp2", 3, r)), test::slurp(kv(tmp / "tp1", 3, 0)));
  shard(tmp / "tp2", tmp / "back", 1);
  expect_same_workspace(tmp / "back", tmp / "tp1");
  // Every layer and rank must have one, of 4 floats.
  fs::remove(kv(ws, 2, 1));
  EXPECT_NE(shard_error(ws, tmp / "out", 1).find("layers.2.past_kv_scale.1.weight: missing tensor file"), std::string::npos);
  write_file(kv(ws, 2, 1), std::string(12, '\0'));
  EXPECT_NE(shard_error(ws, tmp / "out", 1).find("layers.2.past_kv_scale.1.weight: 12 bytes, expected 16"), std::string::npos);
  EXPECT_FALSE(fs::exists(tmp / "out"));
}

TEST(TmShardCli, JsonReportHelpAndOneLineErrors) {
  test::TempDir tmp;
  const fs::path ws = hf2tm(test::model_dir("tiny-llama"), tmp / "ws", 1);
  auto r = test::run(test::tool("tm-shard") + " " + test::q(ws) + " --tp 2 --dst-path " + test::q(tmp / "tp2") + " --json -q");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.err, "");
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["tp_from"], 1);
  EXPECT_EQ(j["tp"], 2);
  EXPECT_EQ(j["dtype"], "float16");
  EXPECT_EQ(j["inter_size"], nlohmann::json({384, 384, 384, 384}));
  EXPECT_EQ(j["tensors"], 2 * 2 + 1 + 4 * (2 + 2 * 5));  // embeddings and head, norm, layers
  EXPECT_EQ(j["files"].size(), files_of(tmp / "tp2").size());
  expect_same_workspace(tmp / "tp2", hf2tm(test::model_dir("tiny-llama"), tmp / "hf2", 2));

  r = test::run(test::tool("tm-shard") + " " + test::q(ws) + " --tp 2 --dst-path " + test::q(tmp / "tp2"));
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err, "tm-shard: error: " + (tmp / "tp2").string() + ": destination exists (use --force to replace it)\n");
  r = test::run(test::tool("tm-shard") + " " + test::q(ws) + " --tp 2 --dst-path " + test::q(tmp / "tp2") + " --force");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("tm-shard: wrote 53 tensor files"), std::string::npos) << r.err;
  r = test::run(test::tool("tm-shard") + " " + test::q(ws) + " --tp 8 --dst-path " + test::q(tmp / "tp8") + " -q");
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err, "tm-shard: error: --tp 8: head_num (attention heads) = 4 is not divisible by it\n");
  r = test::run(test::tool("tm-shard") + " --help");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("--dst-path"), std::string::npos);
  EXPECT_NE(r.out.find("byte for byte"), std::string::npos);
}
