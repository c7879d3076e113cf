// TurboMind workspace (lmdeploy v0.6.4 layout, see shared/specs/turbomind-format.md):
//   <ws>/triton_models/weights/config.yaml   model_config / attention_config / lora_config
//   <ws>/triton_models/weights/<tensor files> raw little-endian, `.{rank}` infix, linears [in, out]
//   <ws>/triton_models/tokenizer/             the model's tokenizer files
// This module owns the config (write and validated read), file names and padding rules;
// converters/ decides what goes into each file and runtime/ reads them back.
#pragma once
#include <string>
#include <vector>

#include "dtype.h"
#include "file_io.h"
#include "hf_config.h"

namespace tmkit {

struct TmConfig {
  // model_config
  std::string model_name, chat_template, model_arch, model_format = "hf";
  int64_t head_num = 0, kv_head_num = 0, hidden_units = 0, size_per_head = 0;
  int64_t vocab_size = 0, embedding_size = 0, num_layer = 0;
  std::vector<int64_t> inter_size;  // per layer, padded
  double norm_eps = 1e-6;
  int64_t attn_bias = 0, start_id = 0, end_id = 0, group_size = 0, session_len = 0, tp = 1;
  std::string weight_type;  // float16 | bfloat16 | int4
  // attention_config
  int64_t rotary_embedding = 0, max_position_embeddings = 0, original_max_position_embeddings = 0;
  double rope_theta = 10000.0, rope_scaling_factor = 0.0, low_freq_factor = 1.0, high_freq_factor = 1.0;
  double attention_factor = 1.0, beta_fast = 32.0, beta_slow = 1.0, softmax_scale = 0.0;
  std::string rope_scaling_type;
  int64_t use_dynamic_ntk = 0, use_logn_attn = 0, cache_block_seq_len = 64;
  // kv_calibration (tmkit's own section, written by kv-calibrate; lmdeploy ignores it): the bits
  // of the past_kv_scale files, and the calibration blocks; 0 when the workspace is uncalibrated.
  int64_t kv_calib_bits = 0, kv_calib_samples = 0, kv_calib_seqlen = 0;

  DType weight_dtype() const;  // F16 or BF16 (int4 workspaces keep fp16 side tensors)
  int64_t vocab_padded() const { return pad_to(vocab_size, tp); }
  RopeConfig rope() const;
  static int64_t pad_to(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
  // lmdeploy 0.6.4's intermediate size for `tp` ranks: ceil(ceil(I / g') / tp) * g' * tp with
  // g' = max(1, group_size), so every rank holds whole groups (zero padding).
  static int64_t pad_inter(int64_t inter, int64_t group_size, int64_t tp) {
    const int64_t g = group_size > 1 ? group_size : 1;
    return (pad_to(inter, g) / g + tp - 1) / tp * g * tp;
  }
};

// The workspace config for `hf` converted at `tp` into `weight_type`; throws naming the
// dimension that does not split across `tp`.
TmConfig make_tm_config(const HfConfig& hf, int64_t tp, const std::string& weight_type);

// config.yaml text, byte-identical to lmdeploy's yaml.safe_dump of the same values.
std::string format_config_yaml(const TmConfig& c);
TmConfig parse_config_yaml(const std::string& text, const std::string& where);

fs::path weights_dir(const fs::path& workspace);
fs::path tokenizer_dir(const fs::path& workspace);
TmConfig load_tm_config(const fs::path& workspace);

// "layers.3.attention.w_qkv" + rank 1 + "weight" -> "layers.3.attention.w_qkv.1.weight"
std::string rank_file(const std::string& prefix, int64_t rank, const std::string& suffix);

// KV calibration files in the weights folder (kv-calibrate writes them, tm-eval and tm-shard read):
//   kv_stats.safetensors                statistics of every layer (calib/kv_calibrate.h)
//   layers.{i}.kv_int{8,4}.{r}.weight   static parameters of rank r: fp32 [4][kv_heads / tp][D],
//                                       the planes k_scale, k_zero, v_scale, v_zero
//   layers.{i}.past_kv_scale.{r}.weight lmdeploy <= 0.3's 4 x fp32 [k_scale, k_zp, v_scale, v_zp]
inline constexpr const char* kKvStatsFile = "kv_stats.safetensors";
std::string kv_static_file(int64_t layer, int bits, int64_t rank);
std::string past_kv_scale_file(int64_t layer, int64_t rank);

// Python's repr() of a float with PyYAML's tweak ("1e-05" -> "1.0e-05").
std::string py_float(double v);

}  // namespace tmkit
