#include "rtn.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <set>
#include <thread>

#include "error.h"
#include "turbomind.h"

namespace tmkit {

Int4Linear quantize_rtn(const float* w, int64_t K, int64_t N, int64_t group) {
  if (group <= 0 || K % group || N % 8) fail("int4: a [{}, {}] linear does not split into groups of {} rows and words of 8 columns", K, N, group);
  Int4Linear q;
  q.K = K;
  q.N = N;
  q.group = group;
  q.qweight.assign(size_t(K * N / 8), 0);
  q.scales.resize(size_t(K / group * N));
  q.zeros.resize(size_t(K / group * N));
  // Groups are independent and write disjoint rows: threads take them in turn (same output for
  // any thread count). Rows are walked in memory order, a group's per-column state side by side.
  auto quantize_group = [&](int64_t g) {
    const size_t cols = size_t(N);
    std::vector<float> lo(cols, INFINITY), hi(cols, -INFINITY);
    std::vector<QuantGroup> p(cols);
    for (int64_t k = g * group; k < (g + 1) * group; ++k)
      for (int64_t n = 0; n < N; ++n) {
        const float v = fp16_round(w[k * N + n]);
        lo[size_t(n)] = std::fmin(lo[size_t(n)], v);
        hi[size_t(n)] = std::fmax(hi[size_t(n)], v);
      }
    for (int64_t n = 0; n < N; ++n) {
      p[size_t(n)] = quant_group(lo[size_t(n)], hi[size_t(n)]);
      q.scales[size_t(g * N + n)] = float_to_half(p[size_t(n)].scale);
      q.zeros[size_t(g * N + n)] = float_to_half(p[size_t(n)].zero);
    }
    for (int64_t k = g * group; k < (g + 1) * group; ++k)
      for (int64_t n = 0; n < N; ++n) {
        const float code = quant_code(fp16_round(w[k * N + n]), p[size_t(n)]);
        q.qweight[size_t(k * (N / 8) + n / 8)] |= int32_t(uint32_t(code) << (4 * (n % 8)));
      }
  };
  const int64_t groups = K / group;
  const int64_t threads = std::min<int64_t>(groups, std::max(1u, std::thread::hardware_concurrency()));
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t g; (g = next++) < groups;) quantize_group(g);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  return q;
}

RtnReport quantize_workspace_rtn(const fs::path& src, const fs::path& dst, int64_t group, bool force) {
  const auto t0 = std::chrono::steady_clock::now();
  check_not_inside(dst, src, "--work-dir");
  const TmConfig c = load_tm_config(src);
  if (c.weight_type == "int4") fail("{}: already an int4 workspace", src.string());
  const DType in_type = c.weight_dtype();
  const int64_t tp = c.tp, hid = c.hidden_units, D = c.size_per_head, H = c.head_num, KV = c.kv_head_num;
  const fs::path sw = weights_dir(src);
  AtomicOutputDir out(dst, force);
  const fs::path dw = weights_dir(out.tmp());
  fs::create_directories(dw);

  auto read_floats = [&](const std::string& name, uint64_t count) {
    MappedFile f(sw / name);
    if (f.size() != count * 2) fail("{}: {} bytes, expected {}", (sw / name).string(), f.size(), count * 2);
    std::vector<float> v(count);
    for (uint64_t i = 0; i < count; ++i) v[i] = load_float(f.data(), in_type, i);
    return v;
  };
  RtnReport rep;
  std::set<std::string> linear_files;
  for (int64_t i = 0; i < c.num_layer; ++i) {
    const std::string L = fmt::format("layers.{}.", i);
    const int64_t Ir = c.inter_size[size_t(i)] / tp;
    const struct { std::string name; int64_t K, N; } linears[] = {
        {"attention.w_qkv", hid, (H + 2 * KV) * D / tp}, {"attention.wo", H * D / tp, hid},
        {"feed_forward.w1", hid, Ir}, {"feed_forward.w3", hid, Ir}, {"feed_forward.w2", Ir, hid}};
    for (const auto& lin : linears) {
      if (lin.K % group)
        fail("{}: {}{} has {} input channels per rank, not a multiple of the group size {}", src.string(), L, lin.name,
             lin.K, group);
      for (int64_t r = 0; r < tp; ++r) {
        check_interrupted();
        const std::string base = rank_file(L + lin.name, r, "");
        const std::string weight = base + "weight";
        const auto w = read_floats(weight, uint64_t(lin.K * lin.N));
        const Int4Linear q = quantize_rtn(w.data(), lin.K, lin.N, group);
        write_file(dw / (base + "qweight"), q.qweight.data(), q.qweight.size() * 4);
        write_file(dw / (base + "scales"), q.scales.data(), q.scales.size() * 2);
        write_file(dw / (base + "zeros"), q.zeros.data(), q.zeros.size() * 2);
        linear_files.insert(weight);
        ++rep.linears;
      }
    }
  }
  // Every other tensor (embeddings, norms, biases, LM head) as fp16.
  for (const auto& e : fs::directory_iterator(sw)) {
    const std::string name = e.path().filename().string();
    if (name == "config.yaml" || linear_files.count(name)) continue;
    MappedFile f(e.path());
    std::vector<uint16_t> v(f.size() / 2);
    for (size_t i = 0; i < v.size(); ++i) {
      v[i] = float_to_half(load_float(f.data(), in_type, i));
      if (half_is_inf(v[i]) && std::isfinite(load_float(f.data(), in_type, i)))
        fail("{}: a value exceeds the float16 range", e.path().string());
    }
    write_file(dw / name, v.data(), v.size() * 2);
  }
  TmConfig q = c;
  q.weight_type = "int4";
  q.group_size = group;
  q.model_format = "awq";
  write_file(dw / "config.yaml", format_config_yaml(q));
  if (fs::exists(tokenizer_dir(src))) fs::copy(tokenizer_dir(src), tokenizer_dir(out.tmp()), fs::copy_options::recursive);
  out.commit();
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace tmkit
