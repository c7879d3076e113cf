// Hugging Face `config.json` of the decoder-only architectures tmkit converts:
// LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases) and
// InternLM2ForCausalLM (packed wqkv). Both transformers-4 (`rope_theta`, `rope_scaling`,
// `torch_dtype`) and transformers-5 (`rope_parameters`, `dtype`) spellings are read.
#pragma once
#include <string>
#include <vector>

#include "file_io.h"

namespace tmkit {

enum class Arch { Llama, Qwen2, InternLM2 };  // Mistral reads as Llama

// Rotary embedding, including the scalings TurboMind knows. `type` is "" for plain RoPE,
// else "linear", "dynamic", "llama3" or "yarn".
struct RopeConfig {
  double theta = 10000.0;
  std::string type;
  double factor = 1.0;
  double low_freq_factor = 1.0, high_freq_factor = 1.0;
  int64_t original_max_position_embeddings = 0;
  double attention_factor = 1.0, beta_fast = 32.0, beta_slow = 1.0;  // yarn
};

struct AwqConfig {
  bool present = false;
  int bits = 0, group_size = 0;
  bool zero_point = true;
  std::string version;  // "gemm"
};

struct HfConfig {
  std::string architecture;  // as written in config.json
  Arch arch = Arch::Llama;
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, layers = 0, inter = 0, vocab = 0;
  int64_t max_position_embeddings = 0;
  double norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool attn_bias = false;  // q/k/v biases (Qwen2; InternLM2 `bias`)
  int64_t bos_id = 0, eos_id = 0;
  std::string dtype;  // "float32" | "float16" | "bfloat16" | "" if absent
  AwqConfig awq;
};

HfConfig parse_hf_config(const std::string& json_text, const std::string& where);
HfConfig load_hf_config(const fs::path& model_dir);

// The files a model folder carries besides its weights that converters copy along: tokenizer and
// generation files (*.json, *.model, *.tiktoken, merges.txt, vocab.txt), sorted by name.
std::vector<fs::path> hf_side_files(const fs::path& model_dir);

}  // namespace tmkit
