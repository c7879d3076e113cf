#include "hf_config.h"

#include <algorithm>
#include <cctype>

#include <nlohmann/json.hpp>

#include <cmath>

#include "error.h"
#include "json_limits.h"

namespace tmkit {

using json = nlohmann::json;

namespace {

constexpr int64_t kMaxDim = int64_t(1) << 24, kMaxLayers = 4096;

struct Reader {
  const json& j;
  const std::string& where;

  const json* find(const char* key) const {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  }
  // Model dimensions are bounded so that every product of two of them fits in int64 and no
  // allocation is sized from an absurd value before the tensors are checked.
  int64_t int_req(const char* key, int64_t max = kMaxDim) const {
    const json* v = find(key);
    if (!v) fail("{}: missing key '{}'", where, key);
    if (!v->is_number_integer() || v->get<int64_t>() <= 0 || v->get<int64_t>() > max)
      fail("{}: '{}' must be an integer in [1, {}]", where, key, max);
    return v->get<int64_t>();
  }
  int64_t int_opt(const char* key, int64_t dflt, int64_t max = kMaxDim) const { return find(key) ? int_req(key, max) : dflt; }
  double num_opt(const json& obj, const char* key, double dflt) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return dflt;
    if (!it->is_number()) fail("{}: '{}' must be a number", where, key);
    return it->get<double>();
  }
  bool bool_opt(const char* key, bool dflt) const {
    const json* v = find(key);
    if (!v) return dflt;
    if (!v->is_boolean()) fail("{}: '{}' must be true or false", where, key);
    return v->get<bool>();
  }
  std::string str_opt(const json& obj, const char* key) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return "";
    if (!it->is_string()) fail("{}: '{}' must be a string", where, key);
    return it->get<std::string>();
  }
  // bos/eos may be a list in newer configs; the first id is the one TurboMind records.
  int64_t token_id(const char* key) const {
    const json* v = find(key);
    if (!v) return 0;
    if (v->is_array() && !v->empty()) v = &(*v)[0];
    if (!v->is_number_integer()) fail("{}: '{}' must be a token id", where, key);
    return v->get<int64_t>();
  }
};

void parse_rope(const Reader& r, RopeConfig* rope) {
  const json* params = r.find("rope_parameters");  // transformers 5
  const json* scaling = r.find("rope_scaling");     // transformers 4
  if (params && !params->is_object()) fail("{}: 'rope_parameters' must be an object", r.where);
  if (scaling && !scaling->is_object()) fail("{}: 'rope_scaling' must be an object or null", r.where);
  rope->theta = r.num_opt(r.j, "rope_theta", 10000.0);
  if (params) rope->theta = r.num_opt(*params, "rope_theta", rope->theta);
  if (!(rope->theta > 1.0) || rope->theta > 1e12) fail("{}: rope_theta {} is out of range", r.where, rope->theta);
  const json* s = params ? params : scaling;
  if (!s) return;
  std::string type = r.str_opt(*s, "rope_type");
  if (type.empty()) type = r.str_opt(*s, "type");
  if (type == "default" || type.empty()) return;
  if (type != "linear" && type != "dynamic" && type != "llama3" && type != "yarn")
    fail("{}: unsupported rope scaling type '{}' (supported: linear, dynamic, llama3, yarn)", r.where, type);
  rope->type = type;
  rope->factor = r.num_opt(*s, "factor", 1.0);
  if (!(rope->factor > 0) || rope->factor > 1e6) fail("{}: rope scaling factor {} is out of range", r.where, rope->factor);
  rope->low_freq_factor = r.num_opt(*s, "low_freq_factor", 1.0);
  rope->high_freq_factor = r.num_opt(*s, "high_freq_factor", 1.0);
  const double orig = r.num_opt(*s, "original_max_position_embeddings", 0);
  if (orig < 0 || orig > double(kMaxDim)) fail("{}: original_max_position_embeddings {} is out of range", r.where, orig);
  rope->original_max_position_embeddings = int64_t(orig);
  // yarn without an explicit attention_factor scales by 0.1 ln(factor) + 1, as HF and lmdeploy do.
  rope->attention_factor = r.num_opt(*s, "attention_factor",
                                     type == "yarn" && rope->factor > 1 ? 0.1 * std::log(rope->factor) + 1.0 : 1.0);
  rope->beta_fast = r.num_opt(*s, "beta_fast", 32.0);
  rope->beta_slow = r.num_opt(*s, "beta_slow", 1.0);
  if (type == "llama3" && (rope->original_max_position_embeddings <= 0 || rope->high_freq_factor <= rope->low_freq_factor))
    fail("{}: llama3 rope scaling needs original_max_position_embeddings and high_freq_factor > low_freq_factor", r.where);
}

}  // namespace

HfConfig parse_hf_config(const std::string& text, const std::string& where) {
  const json j = parse_json(text, 16, where);
  if (!j.is_object()) fail("{}: not a JSON object", where);
  Reader r{j, where};
  HfConfig c;

  const json* archs = r.find("architectures");
  if (!archs || !archs->is_array() || archs->empty() || !(*archs)[0].is_string())
    fail("{}: missing key 'architectures'", where);
  c.architecture = (*archs)[0].get<std::string>();
  if (c.architecture == "LlamaForCausalLM" || c.architecture == "MistralForCausalLM") c.arch = Arch::Llama;
  else if (c.architecture == "Qwen2ForCausalLM") c.arch = Arch::Qwen2;
  else if (c.architecture == "InternLM2ForCausalLM") c.arch = Arch::InternLM2;
  else
    fail("{}: unsupported architecture '{}' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
         "InternLM2ForCausalLM)", where, c.architecture);

  c.hidden = r.int_req("hidden_size");
  c.heads = r.int_req("num_attention_heads");
  c.kv_heads = r.int_opt("num_key_value_heads", c.heads);
  c.layers = r.int_req("num_hidden_layers", kMaxLayers);
  c.inter = r.int_req("intermediate_size");
  c.vocab = r.int_req("vocab_size");
  c.max_position_embeddings = r.int_opt("max_position_embeddings", 2048);
  if (r.bool_opt("mlp_bias", false)) fail("{}: 'mlp_bias': MLP biases are not supported", where);
  if (c.hidden % c.heads != 0 && !r.find("head_dim"))
    fail("{}: hidden_size {} is not a multiple of num_attention_heads {}", where, c.hidden, c.heads);
  c.head_dim = r.int_opt("head_dim", c.hidden / c.heads);
  if ((c.heads + 2 * c.kv_heads) * c.head_dim > kMaxDim) fail("{}: num_attention_heads x head_dim is out of range", where);
  if (c.head_dim % 2 != 0) fail("{}: head_dim {} must be even for rotary embeddings", where, c.head_dim);
  if (c.heads % c.kv_heads != 0)
    fail("{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", where, c.heads, c.kv_heads);
  c.norm_eps = r.num_opt(j, "rms_norm_eps", 1e-6);
  if (!(c.norm_eps > 0 && c.norm_eps < 1)) fail("{}: rms_norm_eps {} is out of range", where, c.norm_eps);
  c.tie_word_embeddings = r.bool_opt("tie_word_embeddings", false);
  c.attn_bias = c.arch == Arch::Qwen2 ? true
              : c.arch == Arch::InternLM2 ? r.bool_opt("bias", false)
                                          : r.bool_opt("attention_bias", false);
  c.bos_id = r.token_id("bos_token_id");
  c.eos_id = r.token_id("eos_token_id");
  c.dtype = r.str_opt(j, "dtype");
  if (c.dtype.empty()) c.dtype = r.str_opt(j, "torch_dtype");
  parse_rope(r, &c.rope);

  if (const json* q = r.find("quantization_config")) {
    if (!q->is_object()) fail("{}: 'quantization_config' must be an object", where);
    const std::string method = r.str_opt(*q, "quant_method");
    if (method != "awq") fail("{}: unsupported quant_method '{}' (supported: awq)", where, method);
    c.awq.present = true;
    const double bits = r.num_opt(*q, "bits", r.num_opt(*q, "w_bit", 4));
    const double group = r.num_opt(*q, "group_size", r.num_opt(*q, "q_group_size", 128));
    if (bits < 1 || bits > 8 || group < 1 || group > 65536) fail("{}: quantization_config bits/group_size out of range", where);
    c.awq.bits = int(bits);
    c.awq.group_size = int(group);
    c.awq.version = r.str_opt(*q, "version");  // AutoAWQ writes "gemm"; older tools "GEMM"; transformers' default
    std::transform(c.awq.version.begin(), c.awq.version.end(), c.awq.version.begin(), [](unsigned char ch) { return char(std::tolower(ch)); });
    if (c.awq.version.empty()) c.awq.version = "gemm";
    auto zp = q->find("zero_point");
    c.awq.zero_point = zp == q->end() || !zp->is_boolean() || zp->get<bool>();
  }
  return c;
}

HfConfig load_hf_config(const fs::path& model_dir) {
  const fs::path p = model_dir / "config.json";
  if (!fs::exists(p)) fail("{}: not found", p.string());
  return parse_hf_config(read_text_file(p), p.string());
}

std::vector<fs::path> hf_side_files(const fs::path& model_dir) {
  std::vector<fs::path> picked;
  for (const auto& e : fs::directory_iterator(model_dir)) {
    if (!e.is_regular_file()) continue;
    const std::string name = e.path().filename().string(), ext = e.path().extension().string();
    if (ext == ".json" || ext == ".py" || ext == ".model" || ext == ".tiktoken" || name == "merges.txt" || name == "vocab.txt")
      picked.push_back(e.path());
  }
  std::sort(picked.begin(), picked.end());
  return picked;
}

}  // namespace tmkit
