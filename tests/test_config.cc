#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "error.h"
#include "hf_config.h"
#include "test_util.h"
#include "turbomind.h"

using namespace tmkit;
using json = nlohmann::json;

namespace {

json llama_json() {
  return json::parse(R"({"architectures":["LlamaForCausalLM"],"hidden_size":4096,"num_attention_heads":32,
    "num_key_value_heads":8,"num_hidden_layers":32,"intermediate_size":14336,"vocab_size":128256,
    "max_position_embeddings":131072,"rms_norm_eps":1e-05,"rope_theta":500000.0,"torch_dtype":"bfloat16",
    "bos_token_id":128000,"eos_token_id":[128001,128008,128009],
    "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
                    "original_max_position_embeddings":8192,"rope_type":"llama3"}})");
}


}  // namespace

TEST(HfConfig, Transformers4Style) {
  HfConfig c = load_hf_config(test::model_dir("tiny-llama"));
  EXPECT_EQ(c.arch, Arch::Llama);
  EXPECT_EQ(c.hidden, 128);
  EXPECT_EQ(c.heads, 4);
  EXPECT_EQ(c.kv_heads, 2);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.layers, 4);
  EXPECT_EQ(c.rope.theta, 10000.0);
  EXPECT_EQ(c.rope.type, "");
  EXPECT_EQ(c.dtype, "float32");
  EXPECT_EQ(c.bos_id, 1);
  EXPECT_EQ(c.eos_id, 2);
  EXPECT_FALSE(c.tie_word_embeddings);
}

TEST(HfConfig, Transformers5Style) {
  HfConfig q = load_hf_config(test::model_dir("tiny-qwen2"));
  EXPECT_EQ(q.arch, Arch::Qwen2);
  EXPECT_TRUE(q.attn_bias);
  EXPECT_TRUE(q.tie_word_embeddings);
  EXPECT_EQ(q.rope.theta, 1e6);
  EXPECT_EQ(q.dtype, "bfloat16");
  HfConfig s = load_hf_config(test::model_dir("small-llama"));
  EXPECT_EQ(s.head_dim, 64);
  EXPECT_EQ(s.rope.theta, 5e5);
  EXPECT_EQ(s.norm_eps, 1e-5);
}

TEST(HfConfig, Llama3RopeAndEosList) {
  HfConfig c = parse_hf_config(llama_json().dump(), "cfg");
  EXPECT_EQ(c.rope.type, "llama3");
  EXPECT_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.eos_id, 128001);
  TmConfig t = make_tm_config(c, 2, "bfloat16");
  EXPECT_EQ(t.rope_scaling_type, "llama3");
  EXPECT_EQ(t.rope_scaling_factor, 8.0);
  EXPECT_EQ(t.high_freq_factor, 4.0);
  EXPECT_EQ(t.use_dynamic_ntk, 0);
  EXPECT_EQ(t.head_num, 32);
  EXPECT_EQ(t.size_per_head, 128);
}

TEST(HfConfig, DynamicAndLinearRope) {
  json j = llama_json();
  j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
  TmConfig t = make_tm_config(parse_hf_config(j.dump(), "cfg"), 1, "float16");
  EXPECT_EQ(t.use_dynamic_ntk, 1);
  EXPECT_EQ(t.rope_scaling_factor, 2.0);
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 4.0}};
  t = make_tm_config(parse_hf_config(j.dump(), "cfg"), 1, "float16");
  EXPECT_EQ(t.rope_scaling_type, "linear");
  EXPECT_EQ(t.use_dynamic_ntk, 0);
  j["rope_scaling"] = {{"rope_type", "longrope"}, {"factor", 4.0}};
  EXPECT_NE(test::error_of([&] { parse_hf_config(j.dump(), "cfg"); }).find("longrope"), std::string::npos);
}

TEST(HfConfig, InternLM2) {
  json j = llama_json();
  j["architectures"] = {"InternLM2ForCausalLM"};
  j["bias"] = false;
  HfConfig c = parse_hf_config(j.dump(), "cfg");
  EXPECT_EQ(c.arch, Arch::InternLM2);
  EXPECT_FALSE(c.attn_bias);
}

TEST(HfConfigBad, MissingKeyAndUnsupportedArch) {
  json j = llama_json();
  j.erase("num_hidden_layers");
  std::string e = test::error_of([&] { parse_hf_config(j.dump(), "some/config.json"); });
  EXPECT_NE(e.find("some/config.json"), std::string::npos) << e;
  EXPECT_NE(e.find("num_hidden_layers"), std::string::npos) << e;
  j = llama_json();
  j["architectures"] = {"GPT2LMHeadModel"};
  e = test::error_of([&] { parse_hf_config(j.dump(), "cfg"); });
  EXPECT_NE(e.find("unsupported architecture 'GPT2LMHeadModel'"), std::string::npos) << e;
  j = llama_json();
  j["hidden_size"] = "big";
  EXPECT_NE(test::error_of([&] { parse_hf_config(j.dump(), "cfg"); }).find("hidden_size"), std::string::npos);
  EXPECT_NE(test::error_of([&] { parse_hf_config("{not json", "cfg"); }).find("not valid JSON"), std::string::npos);
}

TEST(TmConfig, TpDivisibility) {
  HfConfig c = load_hf_config(test::model_dir("tiny-llama"));  // 4 heads, 2 kv heads
  EXPECT_NE(test::error_of([&] { make_tm_config(c, 3, "float16"); }).find("num_attention_heads 4"), std::string::npos);
  EXPECT_NE(test::error_of([&] { make_tm_config(c, 4, "float16"); }).find("num_key_value_heads 2"), std::string::npos);
  EXPECT_EQ(make_tm_config(c, 2, "float16").tp, 2);
}

TEST(TmConfig, InterSizePadding) {
  HfConfig c = parse_hf_config(llama_json().dump(), "cfg");
  c.inter = 11008;
  c.kv_heads = 32;
  EXPECT_EQ(make_tm_config(c, 4, "float16").inter_size[0], 11008);
  EXPECT_EQ(make_tm_config(c, 4, "int4").inter_size[0], 11264);  // the spec's Llama-2-7B example
  c.inter = 1537;
  EXPECT_EQ(make_tm_config(c, 2, "float16").inter_size[0], 1538);
}

TEST(TmConfig, PythonFloatRepr) {
  EXPECT_EQ(py_float(1e-5), "1.0e-05");
  EXPECT_EQ(py_float(1e-6), "1.0e-06");
  EXPECT_EQ(py_float(10000.0), "10000.0");
  EXPECT_EQ(py_float(500000.0), "500000.0");
  EXPECT_EQ(py_float(0.0), "0.0");
  EXPECT_EQ(py_float(0.0001), "0.0001");
  EXPECT_EQ(py_float(123.456), "123.456");
  EXPECT_EQ(py_float(1e16), "1.0e+16");
  EXPECT_EQ(py_float(-2.5e-7), "-2.5e-07");
}

TEST(TmConfig, YamlRoundTripAndPyYamlLayout) {
  TmConfig t = make_tm_config(load_hf_config(test::model_dir("small-llama")), 2, "bfloat16");
  const std::string text = format_config_yaml(t);
  // Lines exactly as yaml.safe_dump writes them (checked against PyYAML).
  for (const char* line : {"attention_config:\n  attention_factor: 1.0\n", "  rope_scaling_type: ''\n",
                           "  rope_theta: 500000.0\n", "  expert_num: []\n", "  inter_size:\n  - 1536\n  - 1536\n",
                           "  norm_eps: 1.0e-05\n", "  weight_type: bfloat16\n", "  tp: 2\n"})
    EXPECT_NE(text.find(line), std::string::npos) << line;
  TmConfig back = parse_config_yaml(text, "config.yaml");
  EXPECT_EQ(format_config_yaml(back), text);
  EXPECT_EQ(back.inter_size, t.inter_size);
  EXPECT_EQ(back.rope_theta, 5e5);
}

TEST(TmConfigBad, YamlMissingOrInconsistent) {
  TmConfig t = make_tm_config(load_hf_config(test::model_dir("tiny-llama")), 1, "float16");
  std::string text = format_config_yaml(t);
  std::string no_heads = text;
  no_heads.erase(no_heads.find("  head_num: 4\n"), 14);
  EXPECT_NE(test::error_of([&] { parse_config_yaml(no_heads, "ws/config.yaml"); }).find("model_config.head_num"), std::string::npos);
  std::string bad_tp = text;
  bad_tp.replace(bad_tp.find("  tp: 1\n"), 8, "  tp: 3\n");
  EXPECT_NE(test::error_of([&] { parse_config_yaml(bad_tp, "ws/config.yaml"); }).find("tp 3"), std::string::npos);
  std::string bad_type = text;
  bad_type.replace(bad_type.find("float16"), 7, "float64");
  EXPECT_NE(test::error_of([&] { parse_config_yaml(bad_type, "ws/config.yaml"); }).find("float64"), std::string::npos);
}

TEST(HfConfig, YarnDefaultAttentionFactor) {
  json j = llama_json();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 8192}};
  EXPECT_NEAR(parse_hf_config(j.dump(), "cfg").rope.attention_factor, 0.1 * std::log(4.0) + 1.0, 1e-12);
  j["rope_scaling"]["attention_factor"] = 1.5;
  EXPECT_EQ(parse_hf_config(j.dump(), "cfg").rope.attention_factor, 1.5);
}

TEST(HfConfigBad, AbsurdValuesAreRefusedBeforeUse) {
  auto err = [](json j) { return test::error_of([&] { parse_hf_config(j.dump(), "cfg"); }); };
  json j = llama_json();
  j["num_hidden_layers"] = 4000000000LL;
  EXPECT_NE(err(j).find("num_hidden_layers"), std::string::npos);
  j = llama_json();
  j["num_attention_heads"] = j["num_key_value_heads"] = 1 << 20;
  j["head_dim"] = 1 << 20;
  EXPECT_NE(err(j).find("head_dim is out of range"), std::string::npos);
  j = llama_json();
  j["rope_theta"] = 0;
  EXPECT_NE(err(j).find("rope_theta"), std::string::npos);
  j = llama_json();
  j["mlp_bias"] = true;
  EXPECT_NE(err(j).find("mlp_bias"), std::string::npos);
  j = llama_json();
  j["rms_norm_eps"] = -1;
  EXPECT_NE(err(j).find("rms_norm_eps"), std::string::npos);
  std::string deep(100, '[');
  EXPECT_NE(test::error_of([&] { parse_hf_config("{\"a\":" + deep, "cfg"); }).find("nested deeper"), std::string::npos);
}

TEST(TmConfigBad, RotaryAndSizesAreChecked) {
  TmConfig t = make_tm_config(load_hf_config(test::model_dir("tiny-llama")), 1, "float16");
  const std::string text = format_config_yaml(t);
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = text;
    s.replace(s.find(from), from.size(), to);
    return test::error_of([&] { parse_config_yaml(s, "ws/config.yaml"); });
  };
  EXPECT_NE(with("rotary_embedding: 32", "rotary_embedding: 64").find("rotary_embedding 64"), std::string::npos);
  EXPECT_NE(with("rotary_embedding: 32", "rotary_embedding: 3").find("rotary_embedding 3"), std::string::npos);
  EXPECT_NE(with("head_num: 4", "head_num: 4294967296").find("head_num"), std::string::npos);
  EXPECT_NE(with("num_layer: 4", "num_layer: 4294967296").find("num_layer"), std::string::npos);
  EXPECT_NE(with("rope_theta: 10000.0", "rope_theta: 0.0").find("rope_theta"), std::string::npos);
  EXPECT_NE(with("rope_scaling_type: ''", "rope_scaling_type: longrope").find("longrope"), std::string::npos);
}
