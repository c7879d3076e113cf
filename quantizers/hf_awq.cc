#include "hf_awq.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "error.h"
#include "hf_config.h"
#include "json_limits.h"
#include "rtn.h"
#include "safetensors.h"

namespace tmkit {

std::vector<uint8_t> int4_codes(const Int4Linear& q) {
  std::vector<uint8_t> codes(size_t(q.K * q.N));
  for (int64_t k = 0; k < q.K; ++k)
    for (int64_t n = 0; n < q.N; ++n) codes[size_t(k * q.N + n)] = uint8_t(int4_code(q, k, n));
  return codes;
}

std::vector<uint8_t> int4_zero_codes(const Int4Linear& q) {
  std::vector<uint8_t> codes(q.zeros.size());
  for (size_t i = 0; i < codes.size(); ++i) {
    const float z = half_to_float(q.zeros[i]);
    if (!(z >= 0.0f && z <= 15.0f) || z != float(int(z))) fail("int4: zero point {} is not an integer 0..15", z);
    codes[i] = uint8_t(z);
  }
  return codes;
}

namespace {

// The decoder linears of the Llama family (Mistral and Qwen2 name them alike).
const std::regex kLinear(R"(^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$)");

std::vector<float> read_floats(const TensorView& v) {
  std::vector<float> out(size_t(v.info->numel()));
  for (size_t i = 0; i < out.size(); ++i) out[i] = load_float(v.data, v.dtype(), i);
  return out;
}

}  // namespace

HfAwqReport write_hf_awq(const fs::path& src, const fs::path& dst, int64_t group, bool force,
                         const std::map<std::string, std::vector<float>>* replaced,
                         const std::map<std::string, AwqPackedLinear>* packed, bool skip_indivisible,
                         uint64_t max_shard_bytes) {
  const auto t0 = std::chrono::steady_clock::now();
  check_not_inside(dst, src, "--work-dir");
  const HfConfig hf = load_hf_config(src);
  if (hf.awq.present) fail("{}: already an AWQ checkpoint (quantization_config)", (src / "config.json").string());
  if (hf.arch == Arch::InternLM2)
    fail("{}: --format hf-awq covers the Llama family (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM); "
         "use --format turbomind for {}", (src / "config.json").string(), hf.architecture);
  const Checkpoint ckpt(src);
  std::vector<std::string> names = ckpt.names();
  std::sort(names.begin(), names.end());

  // Every output tensor, in name order; a quantized linear becomes .qweight, .qzeros, .scales.
  struct Out {
    std::string source;  // the checkpoint tensor it comes from
    int part = -1;       // -1: copied as fp16; 0 qweight, 1 qzeros, 2 scales
  };
  std::vector<TensorSpec> specs;
  std::vector<Out> outs;
  HfAwqReport rep;
  for (const std::string& name : names) {
    const TensorView v = ckpt.get(name);
    if (!is_float(v.dtype())) fail("{}: tensor '{}' has dtype {}, expected a float type", v.file, name, dtype_name(v.dtype()));
    if (!std::regex_match(name, kLinear)) {
      specs.push_back({name, DType::F16, v.info->shape});
      outs.push_back({name, -1});
      continue;
    }
    const int64_t N = v.info->shape.at(0), K = v.info->shape.at(1);
    const std::string base = name.substr(0, name.size() - std::string("weight").size());
    if (K % group && skip_indivisible) {  // kept fp16, by its module's name (e.g. "down_proj")
      const std::string module = base.substr(0, base.size() - 1);  // "model.layers.0.mlp.down_proj"
      rep.not_converted.push_back(module.substr(module.rfind('.') + 1));
      specs.push_back({name, DType::F16, v.info->shape});
      outs.push_back({name, -1});
      continue;
    }
    if (K % group)
      fail("{}: '{}' has {} input channels, not a multiple of the group size {} (--skip-indivisible keeps it fp16)", v.file,
           name, K, group);
    if (N % 8) fail("{}: '{}' has {} output channels, not a multiple of 8", v.file, name, N);
    specs.push_back({base + "qweight", DType::I32, {K, N / 8}});
    specs.push_back({base + "qzeros", DType::I32, {K / group, N / 8}});
    specs.push_back({base + "scales", DType::F16, {K / group, N}});
    for (int part = 0; part < 3; ++part) outs.push_back({name, part});
    ++rep.linears;
  }
  std::vector<size_t> order(specs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return specs[a].name < specs[b].name; });
  std::vector<TensorSpec> sorted;
  for (size_t i : order) sorted.push_back(specs[i]);

  // The three parts of a linear are written one after another (names sort .qweight < .qzeros <
  // .scales), so one quantization serves all three.
  std::string cached_source;
  Int4Linear cached;
  auto values = [&](const TensorView& v) {
    if (replaced) {
      const auto it = replaced->find(v.name());
      if (it != replaced->end()) {
        if (int64_t(it->second.size()) != v.info->numel()) fail("awq: replacement for '{}' has the wrong size", v.name());
        return it->second;
      }
    }
    return read_floats(v);
  };
  auto find_packed = [&](const std::string& name) -> const AwqPackedLinear* {
    if (!packed) return nullptr;
    const auto it = packed->find(name);
    return it == packed->end() ? nullptr : &it->second;
  };
  auto fill = [&](size_t index, uint8_t* out) {
    check_interrupted();
    const Out& o = outs[order[index]];
    const TensorView v = ckpt.get(o.source);
    if (o.part < 0) {
      const std::vector<float> f = values(v);
      auto* h = reinterpret_cast<uint16_t*>(out);
      for (size_t i = 0; i < f.size(); ++i) {
        h[i] = float_to_half(f[i]);
        if (half_is_inf(h[i]) && std::isfinite(f[i])) fail("{}: tensor '{}' exceeds the float16 range", v.file, o.source);
      }
      return;
    }
    if (const AwqPackedLinear* pk = find_packed(o.source)) {
      const AwqPackedLinear& p = *pk;
      const int64_t N = v.info->shape[0], K = v.info->shape[1];
      if (p.K != K || p.N != N || p.group != group || p.qweight.size() != size_t(K * N / 8) ||
          p.qzeros.size() != size_t(K / group * N / 8) || p.scales.size() != size_t(K / group * N))
        fail("awq: the packed linear for '{}' does not match its [{}, {}] shape and group {}", o.source, N, K, group);
      if (o.part == 0) std::memcpy(out, p.qweight.data(), p.qweight.size() * 4);
      else if (o.part == 1) std::memcpy(out, p.qzeros.data(), p.qzeros.size() * 4);
      else std::memcpy(out, p.scales.data(), p.scales.size() * 2);
      return;
    }
    if (cached_source != o.source) {
      const int64_t N = v.info->shape[0], K = v.info->shape[1];
      const std::vector<float> w = values(v);  // [N, K]
      std::vector<float> wt(w.size());              // [K, N], the quantizer's orientation
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) wt[size_t(k * N + n)] = w[size_t(n * K + k)];
      for (float x : wt)
        if (!std::isfinite(x)) fail("{}: tensor '{}' holds NaN or Inf", v.file, o.source);
      cached = quantize_rtn(wt.data(), K, N, group);
      cached_source = o.source;
    }
    if (o.part == 0) {
      const auto p = awq_pack(int4_codes(cached), cached.K, cached.N);
      std::memcpy(out, p.data(), p.size() * 4);
    } else if (o.part == 1) {
      const auto p = awq_pack(int4_zero_codes(cached), cached.K / cached.group, cached.N);
      std::memcpy(out, p.data(), p.size() * 4);
    } else {
      std::memcpy(out, cached.scales.data(), cached.scales.size() * 2);
    }
  };

  AtomicOutputDir dir(dst, force);
  rep.files = write_checkpoint(dir.tmp(), sorted, fill, max_shard_bytes, {{"format", "pt"}});

  // config.json: the source's, with the AutoAWQ quantization_config (keys sorted, 2-space indent,
  // as transformers writes it).
  std::ifstream in(src / "config.json");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  nlohmann::json config = parse_json(text, 64, (src / "config.json").string());
  std::sort(rep.not_converted.begin(), rep.not_converted.end());
  rep.not_converted.erase(std::unique(rep.not_converted.begin(), rep.not_converted.end()), rep.not_converted.end());
  const nlohmann::json not_converted = rep.not_converted.empty() ? nlohmann::json(nullptr) : nlohmann::json(rep.not_converted);
  config["quantization_config"] = {{"bits", 4},           {"group_size", group}, {"modules_to_not_convert", not_converted},
                                   {"quant_method", "awq"}, {"version", "gemm"},  {"zero_point", true}};
  if (config.contains("torch_dtype")) config["torch_dtype"] = "float16";
  if (config.contains("dtype")) config["dtype"] = "float16";
  write_file(dir.tmp() / "config.json", config.dump(2) + "\n");
  for (const fs::path& f : hf_side_files(src)) {  // tokenizer and generation files; config.json and the index are new
    const std::string name = f.filename().string();
    if (name != "config.json" && name != "model.safetensors.index.json") fs::copy_file(f, dir.tmp() / name);
  }
  dir.commit();
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace tmkit
