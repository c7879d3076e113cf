// hf-synth: writes a random Llama-shaped HF checkpoint (config.json + safetensors) with tmkit's
// own safetensors writer, for benchmarks at shapes no shared model has (e.g. 7B).
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "dtype.h"
#include "error.h"
#include "safetensors.h"
#include "splitmix64.h"

int main(int argc, char** argv) {
  int64_t hidden = 4096, layers = 32, heads = 32, kv_heads = 0, inter = 11008, vocab = 32000;
  std::string dtype = "bfloat16", out;
  uint64_t seed = 0;
  double shard_gb = 5.0, scale = 0.02;
  bool force = false;
  CLI::App app{"hf-synth: write a random LlamaForCausalLM checkpoint (defaults: Llama-2-7B shape, bf16)"};
  app.add_option("--out", out, "output model folder")->required();
  app.add_option("--hidden", hidden, "hidden size");
  app.add_option("--layers", layers, "decoder layers");
  app.add_option("--heads", heads, "attention heads");
  app.add_option("--kv-heads", kv_heads, "kv heads (default: --heads)");
  app.add_option("--inter", inter, "MLP intermediate size");
  app.add_option("--vocab", vocab, "vocabulary size");
  app.add_option("--dtype", dtype, "float32, float16 or bfloat16")->check(CLI::IsMember({"float32", "float16", "bfloat16"}));
  app.add_option("--scale", scale, "weights are uniform in [-scale, scale]");
  app.add_option("--seed", seed, "random seed");
  app.add_option("--max-shard-size", shard_gb, "shard size in GB (an index is written when there are several)");
  app.add_flag("--force", force, "replace an existing --out");
  CLI11_PARSE(app, argc, argv);
  if (kv_heads == 0) kv_heads = heads;

  try {
    if (hidden % heads || heads % kv_heads) tmkit::fail("--hidden must divide by --heads and --heads by --kv-heads");
    const tmkit::DType dt = dtype == "float32" ? tmkit::DType::F32 : dtype == "float16" ? tmkit::DType::F16 : tmkit::DType::BF16;
    const int64_t D = hidden / heads;
    std::vector<tmkit::TensorSpec> specs;
    auto add = [&](std::string name, std::vector<int64_t> shape) { specs.push_back({std::move(name), dt, std::move(shape)}); };
    add("model.embed_tokens.weight", {vocab, hidden});
    for (int64_t i = 0; i < layers; ++i) {
      const std::string p = fmt::format("model.layers.{}.", i);
      add(p + "input_layernorm.weight", {hidden});
      add(p + "self_attn.q_proj.weight", {heads * D, hidden});
      add(p + "self_attn.k_proj.weight", {kv_heads * D, hidden});
      add(p + "self_attn.v_proj.weight", {kv_heads * D, hidden});
      add(p + "self_attn.o_proj.weight", {hidden, heads * D});
      add(p + "post_attention_layernorm.weight", {hidden});
      add(p + "mlp.gate_proj.weight", {inter, hidden});
      add(p + "mlp.up_proj.weight", {inter, hidden});
      add(p + "mlp.down_proj.weight", {hidden, inter});
    }
    add("model.norm.weight", {hidden});
    add("lm_head.weight", {vocab, hidden});

    tmkit::AtomicOutputDir dir(out, force);
    auto fill = [&](size_t idx, uint8_t* dst) {
      const auto& s = specs[idx];
      const int64_t n = int64_t(s.nbytes() / tmkit::dtype_size(dt));
      const bool norm = s.shape.size() == 1;
      tmkit::SplitMix64 rng{seed * 0x100000001b3ull + idx};
      for (int64_t k = 0; k < n; ++k) {
        float v = norm ? 1.0f : float(scale * rng.symmetric());
        if (dt == tmkit::DType::F32) std::memcpy(dst + 4 * k, &v, 4);
        else {
          uint16_t h = dt == tmkit::DType::F16 ? tmkit::float_to_half(v) : tmkit::float_to_bf16(v);
          std::memcpy(dst + 2 * k, &h, 2);
        }
      }
    };
    tmkit::install_interrupt_handler();
    tmkit::write_checkpoint(dir.tmp(), specs, fill, uint64_t(shard_gb * 1e9), {{"format", "pt"}});
    nlohmann::json cfg = {
        {"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"hidden_size", hidden},
        {"num_hidden_layers", layers}, {"num_attention_heads", heads}, {"num_key_value_heads", kv_heads},
        {"intermediate_size", inter}, {"vocab_size", vocab}, {"max_position_embeddings", 4096},
        {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0}, {"torch_dtype", dtype}, {"bos_token_id", 1},
        {"eos_token_id", 2}, {"tie_word_embeddings", false}, {"hidden_act", "silu"}};
    tmkit::write_file(dir.tmp() / "config.json", cfg.dump(2) + "\n");
    dir.commit();
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "hf-synth: error: {}\n", tmkit::error_message(e));
    return 1;
  }
}
