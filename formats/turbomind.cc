#include "turbomind.h"

#include <yaml-cpp/yaml.h>

#include <charconv>
#include <map>
#include <variant>

#include "error.h"

namespace tmkit {

namespace {

using Value = std::variant<int64_t, double, std::string, bool, std::vector<int64_t>>;
using Section = std::map<std::string, Value>;  // sorted, as safe_dump sorts keys

bool is_plain_yaml(const std::string& s) {
  if (s.empty()) return false;
  for (char ch : s)
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '-' || ch == '.')) return false;
  static const char* reserved[] = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"};
  std::string low;
  for (char ch : s) low += char(std::tolower(static_cast<unsigned char>(ch)));
  for (const char* r : reserved)
    if (low == r) return false;
  if (std::isdigit(static_cast<unsigned char>(s[0])) || s[0] == '-' || s[0] == '.') return false;
  return true;
}

std::string yaml_scalar(const Value& v) {
  if (auto* i = std::get_if<int64_t>(&v)) return std::to_string(*i);
  if (auto* d = std::get_if<double>(&v)) return py_float(*d);
  if (auto* b = std::get_if<bool>(&v)) return *b ? "true" : "false";
  const std::string& s = std::get<std::string>(v);
  if (is_plain_yaml(s)) return s;
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("''") : std::string(1, ch);
  return out + "'";
}

void emit_section(std::string& out, const std::string& name, const Section& sec) {
  out += name + ":\n";
  for (const auto& [key, v] : sec) {
    if (auto* list = std::get_if<std::vector<int64_t>>(&v)) {
      if (list->empty()) {
        out += "  " + key + ": []\n";
        continue;
      }
      out += "  " + key + ":\n";
      for (int64_t x : *list) out += "  - " + std::to_string(x) + "\n";
    } else {
      out += "  " + key + ": " + yaml_scalar(v) + "\n";
    }
  }
}

struct YamlReader {
  const YAML::Node& node;
  std::string where, section;

  YAML::Node get(const char* key) const {
    YAML::Node v = node[key];
    if (!v || v.IsNull()) fail("{}: missing key '{}.{}'", where, section, key);
    return v;
  }
  template <typename T>
  T as(const char* key) const {
    YAML::Node v = get(key);
    try {
      return v.as<T>();
    } catch (const YAML::Exception&) {
      fail("{}: '{}.{}' has the wrong type", where, section, key);
    }
  }
  template <typename T>
  T opt(const char* key, T dflt) const {
    YAML::Node v = node[key];
    return (!v || v.IsNull()) ? dflt : as<T>(key);
  }
  // Bounded so that products of two dimensions fit in int64 and nothing absurd is allocated.
  int64_t positive(const char* key, int64_t max = int64_t(1) << 24) const {
    int64_t v = as<int64_t>(key);
    if (v <= 0 || v > max) fail("{}: '{}.{}' = {} is out of range [1, {}]", where, section, key, v, max);
    return v;
  }
};

}  // namespace

std::string py_float(double v) {
  if (v != v) return ".nan";
  if (v == 1.0 / 0.0) return ".inf";
  if (v == -1.0 / 0.0) return "-.inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string sci(buf, res.ptr);  // shortest round-trip digits, e.g. "-1.2345e-05"
  bool neg = sci[0] == '-';
  if (neg) sci.erase(0, 1);
  size_t epos = sci.find('e');
  std::string digits = sci.substr(0, epos);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  int exp10 = std::stoi(sci.substr(epos + 1));
  std::string out;
  if (exp10 >= -4 && exp10 < 16) {  // Python repr switches to exponent form outside this range
    if (exp10 < 0) {
      out = "0." + std::string(size_t(-exp10 - 1), '0') + digits;
    } else {
      while (digits.size() < size_t(exp10) + 1) digits += '0';
      out = digits.substr(0, size_t(exp10) + 1) + "." + (digits.size() > size_t(exp10) + 1 ? digits.substr(size_t(exp10) + 1) : "0");
    }
  } else {
    out = digits.substr(0, 1) + "." + (digits.size() > 1 ? digits.substr(1) : "0") +
          fmt::format("e{}{:02d}", exp10 < 0 ? '-' : '+', std::abs(exp10));
  }
  return neg ? "-" + out : out;
}

DType TmConfig::weight_dtype() const { return weight_type == "bfloat16" ? DType::BF16 : DType::F16; }

RopeConfig TmConfig::rope() const {
  RopeConfig r;
  r.theta = rope_theta;
  r.type = rope_scaling_type;
  r.factor = rope_scaling_factor > 0 ? rope_scaling_factor : 1.0;
  r.low_freq_factor = low_freq_factor;
  r.high_freq_factor = high_freq_factor;
  r.original_max_position_embeddings = original_max_position_embeddings;
  r.attention_factor = attention_factor;
  r.beta_fast = beta_fast;
  r.beta_slow = beta_slow;
  return r;
}

TmConfig make_tm_config(const HfConfig& hf, int64_t tp, const std::string& weight_type) {
  if (tp < 1) fail("--tp must be at least 1");
  if (hf.heads % tp) fail("--tp {}: num_attention_heads {} is not divisible by the tensor-parallel size", tp, hf.heads);
  if (hf.kv_heads % tp) fail("--tp {}: num_key_value_heads {} is not divisible by the tensor-parallel size", tp, hf.kv_heads);
  if (hf.hidden % tp) fail("--tp {}: hidden_size {} is not divisible by the tensor-parallel size", tp, hf.hidden);
  TmConfig c;
  c.model_arch = hf.architecture;
  c.head_num = hf.heads;
  c.kv_head_num = hf.kv_heads;
  c.hidden_units = hf.hidden;
  c.size_per_head = hf.head_dim;
  c.vocab_size = hf.vocab;
  c.embedding_size = hf.vocab;
  c.num_layer = hf.layers;
  c.norm_eps = hf.norm_eps;
  c.attn_bias = hf.attn_bias ? 1 : 0;
  c.start_id = hf.bos_id;
  c.end_id = hf.eos_id;
  c.weight_type = weight_type;
  c.group_size = weight_type == "int4" ? 128 : 0;
  c.model_format = weight_type == "int4" ? "awq" : "hf";
  c.session_len = hf.max_position_embeddings;
  c.tp = tp;
  c.inter_size.assign(size_t(hf.layers), TmConfig::pad_inter(hf.inter, c.group_size, tp));
  c.rotary_embedding = hf.head_dim;
  c.max_position_embeddings = hf.max_position_embeddings;
  const RopeConfig& r = hf.rope;
  c.rope_theta = r.theta;
  c.rope_scaling_type = r.type;
  c.rope_scaling_factor = r.type.empty() ? 0.0 : r.factor;
  c.use_dynamic_ntk = r.type == "dynamic" ? 1 : 0;
  c.low_freq_factor = r.low_freq_factor;
  c.high_freq_factor = r.high_freq_factor;
  c.original_max_position_embeddings = r.original_max_position_embeddings;
  c.attention_factor = r.attention_factor;
  c.beta_fast = r.beta_fast;
  c.beta_slow = r.beta_slow;
  return c;
}

std::string format_config_yaml(const TmConfig& c) {
  Section attention = {
      {"attention_factor", c.attention_factor}, {"beta_fast", c.beta_fast}, {"beta_slow", c.beta_slow},
      {"cache_block_seq_len", c.cache_block_seq_len}, {"high_freq_factor", c.high_freq_factor},
      {"low_freq_factor", c.low_freq_factor}, {"max_position_embeddings", c.max_position_embeddings},
      {"original_max_position_embeddings", c.original_max_position_embeddings},
      {"rope_scaling_factor", c.rope_scaling_factor}, {"rope_scaling_type", c.rope_scaling_type},
      {"rope_theta", c.rope_theta}, {"rotary_embedding", c.rotary_embedding}, {"softmax_scale", c.softmax_scale},
      {"use_dynamic_ntk", c.use_dynamic_ntk}, {"use_logn_attn", c.use_logn_attn},
  };
  Section lora = {{"lora_max_wo_r", int64_t(0)}, {"lora_policy", std::string()}, {"lora_r", int64_t(0)},
                  {"lora_rank_pattern", std::string()}, {"lora_scale", 0.0}, {"lora_scale_pattern", std::string()}};
  Section model = {
      {"attn_bias", c.attn_bias}, {"chat_template", c.chat_template}, {"embedding_size", c.embedding_size},
      {"end_id", c.end_id}, {"expert_inter_size", int64_t(0)}, {"expert_num", std::vector<int64_t>{}},
      {"experts_per_token", int64_t(0)}, {"group_size", c.group_size}, {"head_num", c.head_num},
      {"hidden_units", c.hidden_units}, {"inter_size", c.inter_size}, {"kv_head_num", c.kv_head_num},
      {"kv_lora_rank", int64_t(0)}, {"model_arch", c.model_arch}, {"model_format", c.model_format},
      {"model_name", c.model_name}, {"moe_group_num", int64_t(1)}, {"moe_shared_gate", false},
      {"norm_eps", c.norm_eps}, {"norm_topk_prob", false}, {"num_layer", c.num_layer},
      {"q_lora_rank", int64_t(0)}, {"qk_rope_dim", int64_t(0)}, {"routed_scale", 1.0},
      {"session_len", c.session_len}, {"size_per_head", c.size_per_head}, {"start_id", c.start_id},
      {"topk_group", int64_t(1)}, {"topk_method", std::string("greedy")}, {"tp", c.tp},
      {"tune_layer_num", int64_t(1)}, {"v_head_dim", int64_t(0)}, {"vocab_size", c.vocab_size},
      {"weight_type", c.weight_type},
  };
  std::string out;
  emit_section(out, "attention_config", attention);
  if (c.kv_calib_bits) {
    Section kv = {{"calib_samples", c.kv_calib_samples}, {"calib_seqlen", c.kv_calib_seqlen},
                  {"past_kv_scale_bits", c.kv_calib_bits}, {"static_scales", std::string("layers.{i}.kv_int{8,4}.{r}.weight")},
                  {"stats", std::string(kKvStatsFile)}};
    emit_section(out, "kv_calibration", kv);
  }
  emit_section(out, "lora_config", lora);
  emit_section(out, "model_config", model);
  return out;
}

TmConfig parse_config_yaml(const std::string& text, const std::string& where) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    fail("{}: not valid YAML: {}", where, e.msg);
  }
  if (!root.IsMap() || !root["model_config"].IsMap()) fail("{}: missing the model_config map", where);
  YAML::Node mnode = root["model_config"];
  YAML::Node anode = root["attention_config"];
  YAML::Node empty = YAML::Node(YAML::NodeType::Map);
  YamlReader m{mnode, where, "model_config"};
  YamlReader a{anode && anode.IsMap() ? anode : empty, where, "attention_config"};

  TmConfig c;
  c.model_name = m.opt<std::string>("model_name", "");
  c.chat_template = m.opt<std::string>("chat_template", "");
  c.model_arch = m.opt<std::string>("model_arch", "");
  c.model_format = m.opt<std::string>("model_format", "hf");
  c.head_num = m.positive("head_num");
  c.kv_head_num = m.positive("kv_head_num");
  c.hidden_units = m.positive("hidden_units");
  c.size_per_head = m.positive("size_per_head");
  c.vocab_size = m.positive("vocab_size");
  c.embedding_size = m.opt<int64_t>("embedding_size", c.vocab_size);
  if (c.embedding_size == 0) c.embedding_size = c.vocab_size;
  c.num_layer = m.positive("num_layer", 4096);
  c.norm_eps = m.as<double>("norm_eps");
  c.attn_bias = m.opt<int64_t>("attn_bias", 0);
  c.start_id = m.opt<int64_t>("start_id", 0);
  c.end_id = m.opt<int64_t>("end_id", 0);
  c.group_size = m.opt<int64_t>("group_size", 0);
  c.session_len = m.opt<int64_t>("session_len", 0);
  c.tp = m.opt<int64_t>("tp", 1);
  c.weight_type = m.as<std::string>("weight_type");
  if (c.weight_type == "fp16") c.weight_type = "float16";
  if (c.weight_type == "bf16") c.weight_type = "bfloat16";
  if (c.weight_type != "float16" && c.weight_type != "bfloat16" && c.weight_type != "int4")
    fail("{}: unsupported model_config.weight_type '{}'", where, c.weight_type);
  YAML::Node inter = m.get("inter_size");
  if (inter.IsSequence()) {
    for (size_t i = 0; i < inter.size(); ++i) {
      int64_t v = 0;
      try { v = inter[i].as<int64_t>(); } catch (const YAML::Exception&) { v = -1; }
      if (v <= 0 || v > (int64_t(1) << 24)) fail("{}: model_config.inter_size[{}] is out of range", where, i);
      c.inter_size.push_back(v);
    }
    if (int64_t(c.inter_size.size()) != c.num_layer)
      fail("{}: model_config.inter_size has {} entries for {} layers", where, c.inter_size.size(), c.num_layer);
  } else {
    c.inter_size.assign(size_t(c.num_layer), m.positive("inter_size"));
  }
  if (c.tp < 1 || c.tp > 1024) fail("{}: model_config.tp = {} is out of range", where, c.tp);
  if ((c.head_num + 2 * c.kv_head_num) * c.size_per_head > (int64_t(1) << 24))
    fail("{}: head_num x size_per_head is out of range", where);
  if (c.embedding_size != c.vocab_size)
    fail("{}: embedding_size {} differs from vocab_size {} (not supported)", where, c.embedding_size, c.vocab_size);
  if (!(c.norm_eps > 0 && c.norm_eps < 1)) fail("{}: model_config.norm_eps {} is out of range", where, c.norm_eps);
  if (c.head_num % c.tp || c.kv_head_num % c.tp || c.head_num % c.kv_head_num || c.hidden_units % c.tp)
    fail("{}: head_num {}, kv_head_num {} and hidden_units {} do not split across tp {}", where, c.head_num,
         c.kv_head_num, c.hidden_units, c.tp);
  for (int64_t i : c.inter_size)
    if (i % c.tp) fail("{}: inter_size {} is not divisible by tp {}", where, i, c.tp);

  c.rotary_embedding = a.opt<int64_t>("rotary_embedding", c.size_per_head);
  if (c.rotary_embedding < 2 || c.rotary_embedding > c.size_per_head || c.rotary_embedding % 2)
    fail("{}: attention_config.rotary_embedding {} must be even and in [2, size_per_head {}]", where,
         c.rotary_embedding, c.size_per_head);
  c.rope_theta = a.opt<double>("rope_theta", 10000.0);
  if (!(c.rope_theta > 1.0) || c.rope_theta > 1e12) fail("{}: attention_config.rope_theta {} is out of range", where, c.rope_theta);
  c.max_position_embeddings = a.opt<int64_t>("max_position_embeddings", 0);
  c.original_max_position_embeddings = a.opt<int64_t>("original_max_position_embeddings", 0);
  c.rope_scaling_type = a.opt<std::string>("rope_scaling_type", "");
  c.rope_scaling_factor = a.opt<double>("rope_scaling_factor", 0.0);
  c.use_dynamic_ntk = a.opt<int64_t>("use_dynamic_ntk", 0);
  if (c.use_dynamic_ntk && c.rope_scaling_type.empty()) c.rope_scaling_type = "dynamic";
  const std::string& rt = c.rope_scaling_type;
  if (!rt.empty() && rt != "linear" && rt != "dynamic" && rt != "llama3" && rt != "yarn")
    fail("{}: unsupported attention_config.rope_scaling_type '{}'", where, rt);
  if (!rt.empty() && !(c.rope_scaling_factor > 0 && c.rope_scaling_factor < 1e6))
    fail("{}: attention_config.rope_scaling_factor {} is out of range", where, c.rope_scaling_factor);
  if (rt == "dynamic" && c.max_position_embeddings <= 0)
    fail("{}: dynamic rope scaling needs attention_config.max_position_embeddings", where);
  c.low_freq_factor = a.opt<double>("low_freq_factor", 1.0);
  c.high_freq_factor = a.opt<double>("high_freq_factor", 1.0);
  if (rt == "llama3" && (c.original_max_position_embeddings <= 0 || !(c.high_freq_factor > c.low_freq_factor)))
    fail("{}: llama3 rope scaling needs original_max_position_embeddings and high_freq_factor > low_freq_factor", where);
  c.attention_factor = a.opt<double>("attention_factor", 1.0);
  c.beta_fast = a.opt<double>("beta_fast", 32.0);
  c.beta_slow = a.opt<double>("beta_slow", 1.0);
  c.softmax_scale = a.opt<double>("softmax_scale", 0.0);
  c.use_logn_attn = a.opt<int64_t>("use_logn_attn", 0);
  c.cache_block_seq_len = a.opt<int64_t>("cache_block_seq_len", 64);
  if (YAML::Node knode = root["kv_calibration"]; knode && knode.IsMap()) {
    YamlReader k{knode, where, "kv_calibration"};
    c.kv_calib_bits = k.as<int64_t>("past_kv_scale_bits");
    if (c.kv_calib_bits != 8 && c.kv_calib_bits != 4)
      fail("{}: kv_calibration.past_kv_scale_bits must be 8 or 4, not {}", where, c.kv_calib_bits);
    c.kv_calib_samples = k.opt<int64_t>("calib_samples", 0);
    c.kv_calib_seqlen = k.opt<int64_t>("calib_seqlen", 0);
  }
  return c;
}

fs::path weights_dir(const fs::path& ws) { return ws / "triton_models" / "weights"; }
fs::path tokenizer_dir(const fs::path& ws) { return ws / "triton_models" / "tokenizer"; }

TmConfig load_tm_config(const fs::path& ws) {
  const fs::path p = weights_dir(ws) / "config.yaml";
  if (!fs::exists(p)) fail("{}: not a TurboMind workspace (no triton_models/weights/config.yaml)", ws.string());
  return parse_config_yaml(read_text_file(p, 1 << 20), p.string());
}

std::string rank_file(const std::string& prefix, int64_t rank, const std::string& suffix) {
  return fmt::format("{}.{}.{}", prefix, rank, suffix);
}

std::string kv_static_file(int64_t layer, int bits, int64_t rank) {
  return rank_file(fmt::format("layers.{}.kv_int{}", layer, bits), rank, "weight");
}

std::string past_kv_scale_file(int64_t layer, int64_t rank) {
  return rank_file(fmt::format("layers.{}.past_kv_scale", layer), rank, "weight");
}

}  // namespace tmkit
