// Quantizer outputs on the CPU: the AutoAWQ GEMM packing (hand-computed words, round trips), the
// hf-awq checkpoint awq-quantize writes (its codes, scales, config and files, byte-identical
// reruns, bad inputs), and hf2tm reading it back.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "awq_search.h"
#include "cpu_forward.h"
#include "dataset.h"
#include "error.h"
#include "hf2tm.h"
#include "hf_awq.h"
#include "hf_config.h"
#include "model_weights.h"
#include "perplexity.h"
#include "rtn.h"
#include "safetensors.h"
#include "turbomind.h"
#include "splitmix64.h"
#include "test_util.h"

using namespace tmkit;

namespace {

std::vector<int32_t> read_i32(const TensorView& v) {
  std::vector<int32_t> out(size_t(v.info->numel()));
  std::memcpy(out.data(), v.data, out.size() * 4);
  return out;
}

}  // namespace

// Spec awq.md §6.1: nibbles 0..7 of a word hold output channels 0, 2, 4, 6, 1, 3, 5, 7.
TEST(AwqPack, HandComputedWordsAndRoundTrip) {
  const std::vector<uint8_t> codes = {0, 1, 2, 3, 4, 5, 6, 7, 15, 0, 0, 0, 0, 0, 0, 9};
  const std::vector<int32_t> packed = awq_pack(codes, 2, 8);
  EXPECT_EQ(uint32_t(packed[0]), 0x75316420u);
  EXPECT_EQ(uint32_t(packed[1]), 0x9000000Fu);  // channel 7 -> nibble 7, channel 0 -> nibble 0: a negative int32
  EXPECT_EQ(awq_unpack(packed, 2, 8), codes);

  SplitMix64 rng{3};
  std::vector<uint8_t> big(64 * 256);
  for (auto& c : big) c = uint8_t(rng.below(16));
  EXPECT_EQ(awq_unpack(awq_pack(big, 64, 256), 64, 256), big);
  EXPECT_NE(test::error_of([] { awq_pack(std::vector<uint8_t>(12), 1, 12); }).find("N % 8"), std::string::npos);
}

TEST(HfAwq, TinyQwen2CodesScalesConfigAndReruns) {
  test::TempDir tmp;
  const fs::path src = test::model_dir("tiny-qwen2");
  const HfAwqReport rep = write_hf_awq_rtn(src, tmp / "awq", 128, false);
  const HfConfig hf = load_hf_config(tmp / "awq");
  EXPECT_TRUE(hf.awq.present);
  EXPECT_EQ(hf.awq.bits, 4);
  EXPECT_EQ(hf.awq.group_size, 128);
  EXPECT_EQ(hf.awq.version, "gemm");
  EXPECT_EQ(rep.linears, 7 * hf.layers);

  const Checkpoint in(src), out(tmp / "awq");
  int checked = 0;
  for (const std::string& name : in.names()) {
    const TensorView w = in.get(name);
    const std::string base = name.substr(0, name.size() - 6);
    if (!out.has(base + "qweight")) {  // a copied tensor: fp16, same shape and values
      ASSERT_TRUE(out.has(name)) << name;
      const TensorView c = out.get(name);
      EXPECT_EQ(c.dtype(), DType::F16);
      EXPECT_EQ(c.info->shape, w.info->shape);
      for (int64_t i = 0; i < w.info->numel(); i += 97)
        EXPECT_EQ(load_float(c.data, DType::F16, size_t(i)), half_to_float(float_to_half(load_float(w.data, w.dtype(), size_t(i)))));
      continue;
    }
    EXPECT_FALSE(out.has(name)) << "a quantized linear keeps no .weight: " << name;
    const int64_t N = w.info->shape[0], K = w.info->shape[1];
    std::vector<float> wt(size_t(K * N));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) wt[size_t(k * N + n)] = load_float(w.data, w.dtype(), size_t(n * K + k));
    const Int4Linear q = quantize_rtn(wt.data(), K, N, 128);
    const TensorView qw = out.get(base + "qweight"), qz = out.get(base + "qzeros"), sc = out.get(base + "scales");
    EXPECT_EQ(qw.info->shape, (std::vector<int64_t>{K, N / 8}));
    EXPECT_EQ(qz.info->shape, (std::vector<int64_t>{K / 128, N / 8}));
    EXPECT_EQ(sc.info->shape, (std::vector<int64_t>{K / 128, N}));
    EXPECT_EQ(awq_unpack(read_i32(qw), K, N), int4_codes(q)) << base;
    EXPECT_EQ(awq_unpack(read_i32(qz), K / 128, N), int4_zero_codes(q)) << base;
    EXPECT_EQ(std::memcmp(sc.data, q.scales.data(), q.scales.size() * 2), 0) << base;
    ++checked;
  }
  EXPECT_EQ(checked, rep.linears);
  EXPECT_TRUE(out.has("model.layers.0.self_attn.q_proj.bias"));  // Qwen2's q/k/v biases stay, in fp16
  EXPECT_TRUE(fs::exists(tmp / "awq" / "tokenizer.json"));

  write_hf_awq_rtn(src, tmp / "again", 128, false);
  for (const char* f : {"model.safetensors", "config.json"})
    EXPECT_EQ(test::slurp(tmp / "awq" / f), test::slurp(tmp / "again" / f)) << f;
}

TEST(HfAwq, BadInputs) {
  test::TempDir tmp;
  const fs::path src = test::model_dir("tiny-qwen2");
  // The group must divide every linear's input channels; the message names the tensor.
  const std::string indivisible = test::error_of([&] { write_hf_awq_rtn(src, tmp / "g", 96, false); });
  EXPECT_NE(indivisible.find("not a multiple of the group size 96"), std::string::npos) << indivisible;
  EXPECT_NE(indivisible.find("_proj.weight"), std::string::npos) << indivisible;
  EXPECT_FALSE(fs::exists(tmp / "g"));
  // --force never replaces the folder being read, nor one that contains it.
  fs::create_directories(tmp / "m");
  fs::copy(src, tmp / "m" / "tiny-qwen2", fs::copy_options::recursive);
  EXPECT_NE(test::error_of([&] { write_hf_awq_rtn(tmp / "m" / "tiny-qwen2", tmp / "m", 128, true); }).find("contains the source"),
            std::string::npos);
  EXPECT_TRUE(fs::exists(tmp / "m" / "tiny-qwen2" / "config.json"));
  // An existing destination needs --force; an AWQ checkpoint is not quantized again.
  write_hf_awq_rtn(src, tmp / "awq", 128, false);
  EXPECT_NE(test::error_of([&] { write_hf_awq_rtn(src, tmp / "awq", 128, false); }), "");
  EXPECT_NE(test::error_of([&] { write_hf_awq_rtn(tmp / "awq", tmp / "twice", 128, false); }).find("already an AWQ"),
            std::string::npos);
  // The CLI: hf-awq needs an HF folder.
  write_hf_awq_rtn(src, tmp / "rtn", 128, false);
  const auto r = test::run(test::tool("awq-quantize") + " " + test::q(tmp / "awq") + " --method rtn --format hf-awq --work-dir " +
                           test::q(tmp / "x"));
  EXPECT_NE(r.code, 0);
  EXPECT_FALSE(fs::exists(tmp / "x"));
}

namespace {

std::map<std::string, std::string> weight_files(const fs::path& ws) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(weights_dir(ws))) out[e.path().filename().string()] = test::slurp(e.path());
  return out;
}

}  // namespace

// awq-quantize --format turbomind goes through a temporary hf-awq checkpoint: the workspace still
// records the model's own name, reruns are byte-identical, and --tp writes the ranks hf2tm would.
TEST(HfAwq, TurbomindFormatNamesTheModelAndSplitsForTp) {
  test::TempDir tmp;
  const fs::path src = test::model_dir("tiny-qwen2");
  const std::string cmd = test::tool("awq-quantize") + " " + test::q(src) + " --method rtn --format turbomind -q";
  ASSERT_EQ(test::run(cmd + " --work-dir " + test::q(tmp / "a")).code, 0);
  ASSERT_EQ(test::run(cmd + " --work-dir " + test::q(tmp / "b")).code, 0);
  const std::string yaml = test::slurp(tmp / "a" / "triton_models" / "weights" / "config.yaml");
  EXPECT_NE(yaml.find("model_name: tiny-qwen2\n"), std::string::npos) << yaml;
  EXPECT_TRUE(test::run("diff -r " + test::q(tmp / "a") + " " + test::q(tmp / "b")).code == 0) << "reruns differ";
  // tiny-qwen2's o_proj has 128 input channels: 64 per rank at tp 2 cut its int4 groups.
  const auto cut = test::run(cmd + " --tp 2 --work-dir " + test::q(tmp / "cut"));
  EXPECT_NE(cut.err.find("model.layers.*.self_attn.o_proj.weight has 128 input channels, 64 per rank"), std::string::npos)
      << cut.err;
  EXPECT_NE(cut.err.find(src.string()), std::string::npos) << cut.err;
  const auto hf_tp = test::run(test::tool("awq-quantize") + " " + test::q(src) + " --method rtn --tp 2 --work-dir " +
                               test::q(tmp / "hf-tp"));
  EXPECT_NE(hf_tp.err.find("--tp 2: only --format turbomind"), std::string::npos) << hf_tp.err;
  EXPECT_FALSE(fs::exists(tmp / "cut") || fs::exists(tmp / "hf-tp"));
  // small-llama splits: the ranks are hf2tm --tp 2's of the hf-awq checkpoint.
  const fs::path sl = test::model_dir("small-llama");
  ASSERT_EQ(test::run(test::tool("awq-quantize") + " " + test::q(sl) + " --method rtn --format turbomind -q --tp 2 --work-dir " +
                      test::q(tmp / "tp2")).code, 0);
  fs::create_directories(tmp / "hf");  // the model's own folder name: config.yaml records it
  write_hf_awq_rtn(sl, tmp / "hf" / "small-llama", 128, false);
  Hf2TmOptions o;
  o.src = tmp / "hf" / "small-llama";
  o.dst = tmp / "tp2-ref";
  o.tp = 2;
  convert_hf_to_tm(o);
  EXPECT_TRUE(test::run("diff -r " + test::q(tmp / "tp2") + " " + test::q(tmp / "tp2-ref")).code == 0) << "--tp 2 differs";
}

// hf2tm reads the hf-awq checkpoint (spec §6) into the same int4 workspace, byte for byte, as
// awq-quantize --format turbomind writes from the original model: the AWQ order is undone, the q/k
// rotary permutation, q|k|v merge and splits applied to codes, scales and zeros alike.
TEST(HfAwq, Hf2TmOfTheCheckpointEqualsTheTurbomindFormat) {
  for (const std::string model : {"tiny-qwen2", "tiny-llama"}) {
    test::TempDir tmp;
    const fs::path awq = tmp / "awq" / model;  // the same folder name: config.yaml records it
    fs::create_directories(awq.parent_path());
    write_hf_awq_rtn(test::model_dir(model), awq, 128, false);
    Hf2TmOptions o;
    o.src = awq;
    o.dst = tmp / "from-awq";
    convert_hf_to_tm(o);
    o.src = test::model_dir(model);
    o.dst = tmp / "fp16";
    convert_hf_to_tm(o);
    quantize_workspace_rtn(tmp / "fp16", tmp / "rtn", 128, false);
    const auto a = weight_files(tmp / "from-awq"), b = weight_files(tmp / "rtn");
    EXPECT_EQ(a.size(), b.size()) << model;
    for (const auto& [name, bytes] : b) {
      ASSERT_TRUE(a.count(name)) << model << ": " << name;
      EXPECT_TRUE(a.at(name) == bytes) << model << ": " << name << " differs";
    }
  }
}

// small-llama at tp 2 from the AWQ checkpoint: the ranks merge back into tp 1's linears.
TEST(HfAwq, Hf2TmSplitsAwqLinearsForTensorParallel) {
  test::TempDir tmp;
  write_hf_awq_rtn(test::model_dir("small-llama"), tmp / "awq", 128, false);
  Hf2TmOptions o;
  o.src = tmp / "awq";
  o.dst = tmp / "tp1";
  convert_hf_to_tm(o);
  o.dst = tmp / "tp2";
  o.tp = 2;
  convert_hf_to_tm(o);
  const ModelWeights w1 = load_workspace(tmp / "tp1"), w2 = load_workspace(tmp / "tp2");
  ASSERT_EQ(w1.layers.size(), w2.layers.size());
  for (size_t i = 0; i < w1.layers.size(); ++i)
    for (auto m : {&LayerWeights::qkv4, &LayerWeights::wo4, &LayerWeights::w13_4, &LayerWeights::w2_4}) {
      const Int4Linear &a = *(w1.layers[i].*m), &b = *(w2.layers[i].*m);
      EXPECT_EQ(a.qweight, b.qweight) << "layer " << i;
      EXPECT_EQ(a.scales, b.scales) << "layer " << i;
      EXPECT_EQ(a.zeros, b.zeros) << "layer " << i;
    }
  // A split that cuts a quantization group is refused, naming the tensor.
  write_hf_awq_rtn(test::model_dir("tiny-qwen2"), tmp / "q-awq", 128, false);
  o.src = tmp / "q-awq";
  o.dst = tmp / "q-tp2";
  const std::string err = test::error_of([&] { convert_hf_to_tm(o); });
  EXPECT_NE(err.find("o_proj.weight into 64 input channels per rank"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(tmp / "q-tp2"));
  // TurboMind takes AWQ GEMM, 4 bits, group 128 only.
  fs::copy(tmp / "q-awq", tmp / "g64", fs::copy_options::recursive);
  std::string config = test::slurp(tmp / "g64" / "config.json");
  config.replace(config.find("\"group_size\": 128"), 17, "\"group_size\": 64");
  fs::remove(tmp / "g64" / "config.json");
  write_file(tmp / "g64" / "config.json", config);
  o.src = tmp / "g64";
  o.tp = 1;
  EXPECT_NE(test::error_of([&] { convert_hf_to_tm(o); }).find("group_size 64"), std::string::npos);
}

namespace {

double cpu_ppl(const fs::path& ws, const std::string& model) {
  const CpuModel m(load_workspace(ws));
  const auto ids = read_tokens(test::reference_dir(model) / "eval.tokens.i32", m.config().vocab_size);
  const auto ref = nlohmann::json::parse(test::slurp(test::reference_dir(model) / "reference.json"));
  return perplexity(score_from_logits([&](const int32_t* t, int64_t T) { return m.forward(t, T); }), ids,
                    ref["eval_ctx"].get<int64_t>(), 0, 2)
      .ppl;
}

fs::path to_workspace(const fs::path& hf, const fs::path& ws) {
  Hf2TmOptions o;
  o.src = hf;
  o.dst = ws;
  convert_hf_to_tm(o);
  return ws;
}

}  // namespace

// The CPU AWQ search on 16 contiguous blocks of 256 calibration tokens (the reference's own ids):
// the quantized model beats RTN on the eval text, and a rerun writes the same bytes.
TEST(Awq, SearchBeatsRtnAndRerunsIdentically) {
  for (const std::string model : {"tiny-qwen2", "tiny-llama"}) {
    test::TempDir tmp;
    const fs::path src = test::model_dir(model);
    const auto calib = read_tokens(test::reference_dir(model) / "calib.tokens.i32", load_hf_config(src).vocab);
    const auto blocks = sample_blocks(calib, {16, 256, Sampling::Contiguous, 0});
    const AwqResult r = awq_search_cpu(src, blocks, 16, 256, {});
    ASSERT_EQ(int64_t(r.layers.size()), load_hf_config(src).layers);
    for (const auto& l : r.layers) {
      EXPECT_EQ(l.ratio.size(), 4u);
      EXPECT_EQ(l.ratio[1], -1.0) << "o_proj has no scale under GQA";
      for (size_t g : {0, 2, 3}) EXPECT_LE(l.loss_best[g], l.loss_ratio0[g]);
      EXPECT_LT(l.clip_mean_ratio, 1.0);
    }
    fs::create_directories(tmp / "awq");  // the model's own folder name: config.yaml records it
    fs::create_directories(tmp / "rtn");
    write_hf_awq(src, tmp / "awq" / model, 128, false, &r.tensors);
    write_hf_awq_rtn(src, tmp / "rtn" / model, 128, false);
    const double awq = cpu_ppl(to_workspace(tmp / "awq" / model, tmp / "awq-ws"), model);
    const double rtn = cpu_ppl(to_workspace(tmp / "rtn" / model, tmp / "rtn-ws"), model);
    std::printf("%s: AWQ (16 x 256, CPU search) ppl %.4f, RTN %.4f\n", model.c_str(), awq, rtn);
    EXPECT_LT(awq, rtn) << model;
    RecordProperty(model + "_awq_ppl", std::to_string(awq));

    const AwqResult again = awq_search_cpu(src, blocks, 16, 256, {});
    write_hf_awq(src, tmp / "again", 128, false, &again.tensors);
    EXPECT_TRUE(test::slurp(tmp / "awq" / model / "model.safetensors") == test::slurp(tmp / "again" / "model.safetensors"))
        << model << ": reruns differ";
  }
}

// --skip-indivisible: a synthetic Llama (MHA, hidden 128) whose intermediate size 200 does not
// split into groups of 128 keeps down_proj fp16, untouched (its scale group is not searched, it is
// not clipped), listed in modules_to_not_convert; without the flag, and as a TurboMind workspace
// (which holds no fp16 linears), the run fails naming the tensor before any search.
TEST(Awq, SkipIndivisibleKeepsThoseLinearsFp16) {
  test::TempDir tmp;
  const fs::path src = tmp / "synth";
  const std::vector<int32_t> ids = test::indivisible_model(src);
  write_file(tmp / "calib.i32", ids.data(), ids.size() * 4);
  const std::string cmd = test::tool("awq-quantize") + " " + test::q(src) + " --calib-dataset " + test::q(tmp / "calib.i32") +
                          " --calib-samples 4 --calib-seqlen 64 --device cpu -q";
  const auto refused = test::run(cmd + " --work-dir " + test::q(tmp / "refused"));
  EXPECT_NE(refused.err.find("model.layers.*.mlp.down_proj.weight has 200 input channels"), std::string::npos) << refused.err;
  EXPECT_NE(refused.err.find("--skip-indivisible"), std::string::npos) << refused.err;
  const auto tm = test::run(cmd + " --skip-indivisible --format turbomind --work-dir " + test::q(tmp / "tm"));
  EXPECT_NE(tm.err.find("mlp.down_proj.weight has 200 input channels"), std::string::npos) << tm.err;
  EXPECT_NE(tm.err.find("--format hf-awq"), std::string::npos) << tm.err;
  EXPECT_FALSE(fs::exists(tmp / "refused") || fs::exists(tmp / "tm"));

  const auto ok = test::run(cmd + " --skip-indivisible --json --work-dir " + test::q(tmp / "out"));
  ASSERT_EQ(ok.code, 0) << ok.err;
  const auto report = nlohmann::json::parse(ok.out);
  EXPECT_EQ(report["not_converted"], nlohmann::json({"down_proj"}));
  EXPECT_EQ(report["linears"], 12);
  for (const auto& l : report["layers"]) {
    EXPECT_EQ(l["ratio"][3], -1.0) << "down_proj's scale group is not searched";
    EXPECT_GE(l["ratio"][1], 0.0) << "MHA: o_proj's group is";
  }
  const auto config = nlohmann::json::parse(test::slurp(tmp / "out" / "config.json"));
  EXPECT_EQ(config["quantization_config"]["modules_to_not_convert"], nlohmann::json({"down_proj"}));
  const Checkpoint in(src), out(tmp / "out");
  EXPECT_FALSE(out.has("model.layers.0.mlp.down_proj.qweight"));
  EXPECT_TRUE(out.has("model.layers.0.mlp.up_proj.qweight"));
  for (const std::string name : {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}) {
    const TensorView a = in.get(name), b = out.get(name);
    ASSERT_EQ(b.dtype(), DType::F16);
    EXPECT_EQ(std::memcmp(a.data, b.data, size_t(a.info->numel()) * 2), 0) << name << " changed";
  }
}

TEST(Awq, BadInputs) {
  test::TempDir tmp;
  const fs::path src = test::model_dir("tiny-qwen2");
  const auto calib = read_tokens(test::reference_dir("tiny-qwen2") / "calib.tokens.i32", load_hf_config(src).vocab);
  // Too few calibration tokens: the dataset's error.
  EXPECT_NE(test::error_of([&] { sample_blocks(calib, {100000, 512, Sampling::Contiguous, 0}); }).find("calibration data has"),
            std::string::npos);
  // A group that does not divide the input channels names the tensor.
  AwqOptions g96;
  g96.group = 96;
  const auto blocks = sample_blocks(calib, {2, 64, Sampling::Contiguous, 0});
  EXPECT_NE(test::error_of([&] { awq_search_cpu(src, blocks, 2, 64, g96); }).find("q_proj.weight has 128 input channels"),
            std::string::npos);
  // A NaN weight: the error names the layer and the tensor.
  fs::copy(src, tmp / "nan", fs::copy_options::recursive);
  fs::permissions(tmp / "nan" / "model.safetensors", fs::perms::owner_write, fs::perm_options::add);
  {
    const SafetensorsFile f(tmp / "nan" / "model.safetensors");
    const TensorInfo* t = f.find("model.layers.1.mlp.up_proj.weight");
    ASSERT_NE(t, nullptr);
    std::string bytes = test::slurp(tmp / "nan" / "model.safetensors");
    uint64_t header = 0;
    std::memcpy(&header, bytes.data(), 8);
    const uint16_t nan = 0x7fc0;  // bf16 and fp16 NaN alike
    std::memcpy(bytes.data() + 8 + header + t->begin, &nan, 2);
    fs::remove(tmp / "nan" / "model.safetensors");
    write_file(tmp / "nan" / "model.safetensors", bytes);
  }
  const std::string nan_err = test::error_of([&] { awq_search_cpu(tmp / "nan", blocks, 2, 64, {}); });
  EXPECT_NE(nan_err.find("layer 1: up_proj.weight holds NaN or Inf"), std::string::npos) << nan_err;
  // The CLI: --method awq needs calibration data and leaves nothing behind on error.
  const auto r = test::run(test::tool("awq-quantize") + " " + test::q(src) + " --work-dir " + test::q(tmp / "out"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("--calib-dataset"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(tmp / "out"));
}
