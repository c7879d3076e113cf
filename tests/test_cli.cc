// The tools as a user runs them: every bad input gives a one-line error naming the file, tensor
// or flag, a non-zero exit, and leaves nothing behind; good runs are atomic and deterministic.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <set>

#include "dtype.h"
#include "test_util.h"

using namespace tmkit;
using json = nlohmann::json;
using test::q;
using test::TempDir;
namespace fs = std::filesystem;

namespace {

// A safetensors file split into its JSON header and data area, editable and writable again.
struct RawSafetensors {
  json header;
  std::string data;

  static RawSafetensors load(const fs::path& p) {
    const std::string raw = test::slurp(p);
    uint64_t n = 0;
    std::memcpy(&n, raw.data(), 8);
    return {json::parse(raw.substr(8, n)), raw.substr(8 + n)};
  }
  void save(const fs::path& p) const {
    const std::string h = header.dump();
    std::string out(8, '\0');
    const uint64_t n = h.size();
    std::memcpy(out.data(), &n, 8);
    std::ofstream(p, std::ios::binary) << out << h << data;
  }
};

// A copy of a shared model's folder that a test may damage.
fs::path copy_model(const TempDir& tmp, const std::string& model) {
  const fs::path dst = tmp / ("src-" + model);
  fs::create_directories(dst);
  for (const auto& e : fs::directory_iterator(test::model_dir(model))) fs::copy_file(e.path(), dst / e.path().filename());
  return dst;
}

void edit_config(const fs::path& model, const std::function<void(json&)>& edit) {
  json c = json::parse(test::slurp(model / "config.json"));
  edit(c);
  std::ofstream(model / "config.json") << c.dump(2);
}

std::set<std::string> listing(const fs::path& dir) {
  std::set<std::string> s;
  for (const auto& e : fs::directory_iterator(dir)) s.insert(e.path().filename().string());
  return s;
}

// Runs hf2tm on `src` into <tmp>/ws and expects a failure whose single line contains `parts`,
// with nothing written beside the sources.
void expect_hf2tm_error(const TempDir& tmp, const fs::path& src, const std::string& flags,
                        const std::vector<std::string>& parts) {
  const auto before = listing(tmp.path());
  const auto r = test::run(test::tool("hf2tm") + " -q " + q(src) + " --dst-path " + q(tmp / "ws") + " " + flags);
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(r.err.rfind("hf2tm: error: ", 0), 0u) << r.err;
  for (const auto& p : parts) EXPECT_NE(r.err.find(p), std::string::npos) << "missing '" << p << "' in: " << r.err;
  EXPECT_EQ(listing(tmp.path()), before) << "output left behind";
}

}  // namespace

TEST(Hf2TmCli, HelpExplainsItself) {
  const auto r = test::run(test::tool("hf2tm") + " --help");
  EXPECT_EQ(r.code, 0);
  for (const char* s : {"--dst-path", "--tp", "--dtype", "--force", "--json", "TurboMind"})
    EXPECT_NE(r.out.find(s), std::string::npos) << s;
}

TEST(Hf2TmCli, JsonReportDeterminismAndForce) {
  TempDir tmp;
  const std::string cmd = test::tool("hf2tm") + " " + q(test::model_dir("tiny-qwen2")) + " --tp 2 --json --dst-path ";
  const auto a = test::run(cmd + q(tmp / "a"));
  ASSERT_EQ(a.code, 0) << a.err;
  const json rep = json::parse(a.out);
  EXPECT_EQ(rep["tp"], 2);
  EXPECT_EQ(rep["dtype"], "bfloat16");
  // embedding and lm head per rank, final norm; per layer 2 norms and per rank qkv, wo (weight + bias), w1, w3, w2
  EXPECT_EQ(rep["tensors"].get<int64_t>(), 2 * 2 + 1 + 2 * (2 + 2 * 7));
  EXPECT_GT(rep["bytes"].get<int64_t>(), 0);
  EXPECT_TRUE(rep.contains("seconds"));
  EXPECT_TRUE(rep["files"].is_array());

  ASSERT_EQ(test::run(cmd + q(tmp / "b")).code, 0);
  for (const auto& e : fs::recursive_directory_iterator(tmp / "a")) {
    if (!e.is_regular_file()) continue;
    const fs::path rel = fs::relative(e.path(), tmp / "a");
    EXPECT_EQ(test::slurp(e.path()), test::slurp(tmp / "b" / rel)) << rel;
  }
  // An existing destination is refused without --force and left untouched; --force replaces it.
  const auto refused = test::run(cmd + q(tmp / "a"));
  EXPECT_NE(refused.code, 0);
  EXPECT_NE(refused.err.find("--force"), std::string::npos) << refused.err;
  EXPECT_TRUE(fs::exists(tmp / "a" / "triton_models" / "weights" / "config.yaml"));
  EXPECT_EQ(test::run(cmd + q(tmp / "a") + " --force").code, 0);
  EXPECT_EQ(listing(tmp.path()), (std::set<std::string>{"a", "b"}));
}

TEST(Hf2TmBad, TruncatedSafetensors) {
  TempDir tmp;
  const fs::path src = copy_model(tmp, "tiny-llama");
  fs::resize_file(src / "model.safetensors", fs::file_size(src / "model.safetensors") / 2);
  expect_hf2tm_error(tmp, src, "", {"model.safetensors", "outside the"});
  fs::resize_file(src / "model.safetensors", 5);
  expect_hf2tm_error(tmp, src, "", {"model.safetensors", "truncated"});
}

TEST(Hf2TmBad, HeaderLengthPastTheEnd) {
  TempDir tmp;
  const fs::path src = copy_model(tmp, "tiny-llama");
  std::string raw = test::slurp(src / "model.safetensors");
  const uint64_t n = raw.size();
  std::memcpy(raw.data(), &n, 8);
  std::ofstream(src / "model.safetensors", std::ios::binary) << raw;
  expect_hf2tm_error(tmp, src, "", {"model.safetensors", "header length", "past the end"});
}

TEST(Hf2TmBad, OverlappingSpans) {
  TempDir tmp;
  const fs::path src = copy_model(tmp, "tiny-llama");
  auto st = RawSafetensors::load(src / "model.safetensors");
  st.header["model.layers.0.self_attn.o_proj.weight"]["data_offsets"] =
      st.header["model.layers.0.self_attn.q_proj.weight"]["data_offsets"];
  st.save(src / "model.safetensors");
  expect_hf2tm_error(tmp, src, "", {"model.safetensors", "overlap", "model.layers.0.self_attn."});
}

TEST(Hf2TmBad, DtypeShapeMismatch) {
  TempDir tmp;
  const fs::path src = copy_model(tmp, "tiny-llama");
  auto st = RawSafetensors::load(src / "model.safetensors");
  st.header["model.norm.weight"]["dtype"] = "F16";
  st.save(src / "model.safetensors");
  expect_hf2tm_error(tmp, src, "", {"model.safetensors", "'model.norm.weight'", "256 bytes", "512"});
}

TEST(Hf2TmBad, TensorShapeDisagreesWithConfig) {
  TempDir tmp;
  const fs::path src = copy_model(tmp, "tiny-llama");
  edit_config(src, [](json& c) { c["intermediate_size"] = 512; });
  expect_hf2tm_error(tmp, src, "", {"model.layers.0.mlp.gate_proj.weight", "[384, 128]", "[512, 128]"});
}

TEST(Hf2TmBad, IndexNamingAParentFolder) {
  TempDir tmp;
  const fs::path src = copy_model(tmp, "small-llama");
  std::string index = test::slurp(src / "model.safetensors.index.json");
  const std::string from = "model-00002-of-00002.safetensors";
  index.replace(index.find(from), from.size(), "../x.safetensors");
  std::ofstream(src / "model.safetensors.index.json") << index;
  expect_hf2tm_error(tmp, src, "", {"model.safetensors.index.json", "'../x.safetensors'", "leaves the model folder"});
}

TEST(Hf2TmBad, MissingConfigKey) {
  TempDir tmp;
  const fs::path src = copy_model(tmp, "tiny-qwen2");
  edit_config(src, [](json& c) { c.erase("num_attention_heads"); });
  expect_hf2tm_error(tmp, src, "", {"config.json", "missing key 'num_attention_heads'"});
}

TEST(Hf2TmBad, UnsupportedArchitecture) {
  TempDir tmp;
  const fs::path src = copy_model(tmp, "tiny-qwen2");
  edit_config(src, [](json& c) { c["architectures"] = {"MixtralForCausalLM"}; });
  expect_hf2tm_error(tmp, src, "", {"config.json", "unsupported architecture 'MixtralForCausalLM'"});
}

TEST(Hf2TmBad, HeadsNotDivisibleByTp) {
  TempDir tmp;
  expect_hf2tm_error(tmp, test::model_dir("tiny-llama"), "--tp 3", {"--tp 3", "num_attention_heads 4"});
  expect_hf2tm_error(tmp, test::model_dir("tiny-llama"), "--tp 4", {"--tp 4", "num_key_value_heads 2"});
}

TEST(Hf2TmBad, UnwritableDestination) {
  TempDir tmp;
  std::ofstream(tmp / "a-file") << "x";
  const auto r = test::run(test::tool("hf2tm") + " " + q(test::model_dir("tiny-llama")) + " --dst-path " +
                           q(tmp / "a-file" / "ws"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find((tmp / "a-file" / "ws").string()), std::string::npos) << r.err;
  EXPECT_EQ(listing(tmp.path()), (std::set<std::string>{"a-file"}));
}

TEST(Hf2TmBad, UnusedTensorIsNotDropped) {
  TempDir tmp;
  const fs::path src = copy_model(tmp, "tiny-llama");
  auto st = RawSafetensors::load(src / "model.safetensors");
  const uint64_t end = st.data.size();
  st.header["model.layers.0.mlp.gate_proj.bias"] = {{"dtype", "F32"}, {"shape", {384}}, {"data_offsets", {end, end + 384 * 4}}};
  st.data.append(384 * 4, '\0');
  st.save(src / "model.safetensors");
  expect_hf2tm_error(tmp, src, "", {"model.layers.0.mlp.gate_proj.bias", "is not used"});
}

TEST(Hf2TmBad, ForceNeverReplacesTheSource) {
  TempDir tmp;
  const fs::path src = copy_model(tmp, "tiny-llama");
  for (const fs::path& dst : {src, tmp.path()}) {
    const auto r = test::run(test::tool("hf2tm") + " -q " + q(src) + " --force --dst-path " + q(dst));
    EXPECT_NE(r.code, 0);
    EXPECT_NE(r.err.find("contains the source model folder"), std::string::npos) << r.err;
  }
  EXPECT_TRUE(fs::exists(src / "model.safetensors"));
}

TEST(Hf2TmBad, BadFlags) {
  TempDir tmp;
  for (const char* flags : {"--tp 0", "--dtype float64", "--tp x"}) {
    const auto r = test::run(test::tool("hf2tm") + " " + q(test::model_dir("tiny-llama")) + " --dst-path " + q(tmp / "ws") + " " + flags);
    EXPECT_NE(r.code, 0) << flags;
    EXPECT_NE(r.err.find(std::string(flags).substr(0, std::string(flags).find(' '))), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(tmp / "ws"));
  }
}

TEST(Hf2TmBad, Fp16OverflowFromBf16) {
  TempDir tmp;
  const fs::path src = copy_model(tmp, "tiny-qwen2");
  auto st = RawSafetensors::load(src / "model.safetensors");
  const uint64_t off = st.header["model.layers.1.mlp.down_proj.weight"]["data_offsets"][0];
  const uint16_t big = float_to_bf16(1e6f);
  std::memcpy(st.data.data() + off + 2 * 7, &big, 2);
  st.save(src / "model.safetensors");
  expect_hf2tm_error(tmp, src, "--dtype float16", {"model.layers.1.mlp.down_proj.weight", "1 values exceed the float16 range"});
  const auto r = test::run(test::tool("hf2tm") + " " + q(src) + " --dtype float16 --allow-overflow --json --dst-path " + q(tmp / "ws"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["overflow_values"], 1);
  // bf16 output keeps the value: no overflow.
  EXPECT_EQ(test::run(test::tool("hf2tm") + " " + q(src) + " -q --dst-path " + q(tmp / "ws-bf16")).code, 0);
}

TEST(TmEvalBad, WorkspaceAndTokens) {
  TempDir tmp;
  ASSERT_EQ(test::run(test::tool("hf2tm") + " -q " + q(test::model_dir("tiny-llama")) + " --dst-path " + q(tmp / "ws")).code, 0);
  const std::string ppl = test::tool("tm-eval") + " ppl -q -c 64 -m ";

  auto r = test::run(ppl + q(tmp / "nothing") + " --tokens " + q(test::reference_dir("tiny-llama") / "eval.tokens.i32"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("not a TurboMind workspace"), std::string::npos) << r.err;

  std::ofstream(tmp / "odd.i32", std::ios::binary) << "abcde";
  r = test::run(ppl + q(tmp / "ws") + " --tokens " + q(tmp / "odd.i32"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("odd.i32"), std::string::npos) << r.err;

  const int32_t ids[3] = {1, 5000, 2};
  std::ofstream(tmp / "big.i32", std::ios::binary).write(reinterpret_cast<const char*>(ids), sizeof ids);
  r = test::run(ppl + q(tmp / "ws") + " --tokens " + q(tmp / "big.i32"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("token 1 = 5000"), std::string::npos) << r.err;

  r = test::run(test::tool("tm-eval") + " ppl -q -c 1048576 -m " + q(tmp / "ws") + " --tokens " +
                q(test::reference_dir("tiny-llama") / "eval.tokens.i32"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("fewer than one chunk"), std::string::npos) << r.err;

  // One chunk of 340000 tokens would hold [T, T] attention scores (~430 GiB) on the CPU: refused
  // before any work, naming -c, with a warning that it is past the trained context (1024).
  r = test::run(test::tool("tm-eval") + " ppl -q --device cpu -c 340000 -m " + q(tmp / "ws") + " --tokens " +
                q(test::reference_dir("tiny-llama") / "eval.tokens.i32"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("-c 340000: the CPU oracle needs about"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("GiB of host memory is available; lower -c"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("bad_alloc"), std::string::npos) << r.err;
  r = test::run(test::tool("tm-eval") + " ppl -q --device cpu -c 2048 --chunks 1 -m " + q(tmp / "ws") + " --tokens " +
                q(test::reference_dir("tiny-llama") / "eval.tokens.i32"));
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("-c 2048 is longer than the model's trained context (1024 positions"), std::string::npos) << r.err;

  // A damaged weight file is named, not silently used.
  fs::resize_file(tmp / "ws" / "triton_models" / "weights" / "layers.2.attention.wo.0.weight", 100);
  r = test::run(ppl + q(tmp / "ws") + " --tokens " + q(test::reference_dir("tiny-llama") / "eval.tokens.i32"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("layers.2.attention.wo.0.weight: 100 bytes, expected 32768"), std::string::npos) << r.err;
}

TEST(TmEvalCli, TokenizeDetokenizeRoundTrip) {
  TempDir tmp;
  const fs::path text = test::shared_dir() / "data" / "calib.txt";
  for (const char* model : {"tiny-llama", "small-llama"}) {
    const auto r = test::run(test::tool("tm-eval") + " tokenize -q -m " + q(test::model_dir(model)) + " -f " + q(text) +
                             " -o " + q(tmp / "ids.i32") + " --force");
    ASSERT_EQ(r.code, 0) << r.err;
    EXPECT_EQ(test::slurp(tmp / "ids.i32"), test::slurp(test::reference_dir(model) / "calib.tokens.i32")) << model;
    const auto d = test::run(test::tool("tm-eval") + " detokenize -m " + q(test::model_dir(model)) + " --tokens " +
                             q(tmp / "ids.i32"));
    ASSERT_EQ(d.code, 0) << d.err;
    EXPECT_TRUE(d.out == test::slurp(text)) << model;
  }
  // .jsonl with --text-key: documents joined with a blank line.
  std::ofstream(tmp / "d.jsonl") << "{\"body\": \"Hello\"}\n{\"body\": \"world\"}\n";
  const auto j = test::run(test::tool("tm-eval") + " tokenize -q --text-key body -m " + q(test::model_dir("small-llama")) +
                           " -f " + q(tmp / "d.jsonl") + " -o " + q(tmp / "j.i32"));
  ASSERT_EQ(j.code, 0) << j.err;
  std::ofstream(tmp / "plain.txt") << "Hello\n\nworld";
  ASSERT_EQ(test::run(test::tool("tm-eval") + " tokenize -q -m " + q(test::model_dir("small-llama")) + " -f " +
                      q(tmp / "plain.txt") + " -o " + q(tmp / "p.i32")).code, 0);
  EXPECT_EQ(test::slurp(tmp / "j.i32"), test::slurp(tmp / "p.i32"));
  // A missing key is named with its line.
  std::ofstream(tmp / "bad.jsonl") << "{\"body\": \"x\"}\n{\"text\": \"y\"}\n";
  const auto bad = test::run(test::tool("tm-eval") + " tokenize -q --text-key body -m " + q(test::model_dir("small-llama")) +
                             " -f " + q(tmp / "bad.jsonl") + " -o " + q(tmp / "b.i32"));
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.err.find("bad.jsonl"), std::string::npos) << bad.err;
  EXPECT_NE(bad.err.find("2"), std::string::npos) << bad.err;
  EXPECT_FALSE(fs::exists(tmp / "b.i32"));
}
