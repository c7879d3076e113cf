// The attention kernels on their own (ctest label `gpu`; skips without a CUDA device), against
// attention in double: decode and prefill over every cache format, and prefill over long inputs
// (the forward's own fp32 rows, or a cache). test_gpu.cc checks them inside whole forwards.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <fmt/format.h>

#include <cmath>
#include <string>

#include "cuda/kernels.h"
#include "device_copy.h"
#include "dtype.h"
#include "gpu_model.h"
#include "kv_quant.h"
#include "splitmix64.h"
#include "test_util.h"

using namespace tmkit;
using cuda::DeviceBuffer;

namespace {

// Causal attention in double: queries = the last T of each sequence's N rows (positions N - T ..),
// keys and values = all N rows, as `kv` holds them ([B N, width], q/k/v heads at 0, H D, (H + KV) D).
std::vector<float> attention_double(const std::vector<float>& kv, int B, int N, int T, int H, int KV, int D) {
  const int width = (H + 2 * KV) * D, P = N - T;
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<float> out(size_t(B) * T * H * D);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < H; ++h) {
        const int kvh = h / (H / KV), qpos = P + t;
        const float* qr = kv.data() + (size_t(b) * N + qpos) * width + size_t(h) * D;
        std::vector<double> s(size_t(qpos + 1));
        double m = -1e300, sum = 0;
        for (int j = 0; j <= qpos; ++j) {
          const float* kr = kv.data() + (size_t(b) * N + j) * width + size_t(H + kvh) * D;
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += double(qr[d]) * kr[d];
          m = std::max(m, s[size_t(j)] = dot * scale);
        }
        for (double& x : s) sum += (x = std::exp(x - m));
        for (int d = 0; d < D; ++d) {
          double o = 0;
          for (int j = 0; j <= qpos; ++j) o += s[size_t(j)] * kv[(size_t(b) * N + j) * width + size_t(H + KV + kvh) * D + d];
          out[(size_t(b) * T + t) * H * D + size_t(h) * D + d] = float(o / sum);
        }
      }
  return out;
}

// B sequences of N = P + T random rows (scale 2) appended to a fresh cache in `mode`; the queries
// are each sequence's last T rows. reference(): attention in double over the values the cache
// holds (the oracle's rounding of K and V).
struct CachedCase {
  int B, H, KV, D, T, P, N, width;
  KvMode mode;
  std::vector<float> all, q;
  DeviceBuffer<float> all_d, q_d;
  cuda::KvCache cache;

  CachedCase(int B_, int H_, int KV_, int D_, int T_, int P_, int capacity, KvMode mode_, uint64_t seed)
      : B(B_), H(H_), KV(KV_), D(D_), T(T_), P(P_), N(P_ + T_), width((H_ + 2 * KV_) * D_), mode(mode_) {
    SplitMix64 rng{seed};
    all.resize(size_t(B) * N * width);
    for (float& v : all) v = float(rng.symmetric()) * 2.0f;
    q.resize(size_t(B) * T * width);
    for (int b = 0; b < B; ++b)
      std::copy_n(all.begin() + (size_t(b) * N + P) * width, size_t(T) * width, q.begin() + size_t(b) * T * width);
    all_d.resize(all.size());
    q_d.resize(q.size());
    cudaMemcpy(all_d.get(), all.data(), all.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(q_d.get(), q.data(), q.size() * 4, cudaMemcpyHostToDevice);
    cache.allocate(mode == KvMode::kFp16 ? 16 : int(mode), 1, B, KV, D, capacity);
    cuda::kv_append(all_d.get(), B, N, H, cache.layer(0), 0, nullptr, nullptr);
  }
  std::vector<float> reference() const {
    std::vector<float> held = all;
    for (size_t r = 0; r < size_t(B) * N; ++r)
      for (int h = 0; h < 2 * KV; ++h) kv_cache_roundtrip(held.data() + r * width + (H + h) * D, D, mode);
    return attention_double(held, B, N, T, H, KV, D);
  }
  std::string name() const {
    return fmt::format("D={} {} H={} KV={} T={} P={}", D, kv_mode_name(mode), H, KV, T, P);
  }
};

template <typename T>
std::vector<float> host_floats(const DeviceBuffer<T>& d) {
  std::vector<uint16_t> bits(d.size());
  cudaMemcpy(bits.data(), d.get(), bits.size() * 2, cudaMemcpyDeviceToHost);
  std::vector<float> f(bits.size());
  for (size_t i = 0; i < f.size(); ++i) f[i] = std::is_same_v<T, __half> ? half_to_float(bits[i]) : bf16_to_float(bits[i]);
  return f;
}

}  // namespace

// Over the forward's rows (positions 0 .. T - 1): T below, at and past the 64-row tiles, GQA groups
// of 1, 3 and 4, every head_dim; fp16 output, and bf16 for a bf16 model (inputs rounded to bf16:
// 2^-8, a looser bar). A second run gives the same bits.
TEST(GpuAttentionPrefill, ForwardRowsMatchDouble) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  struct Shape { int H, KV, T; };
  const Shape shapes[] = {{4, 4, 1}, {6, 2, 63}, {8, 2, 64}, {4, 1, 65}, {8, 2, 200}};
  const int B = 2;
  double worst[2] = {0, 0};
  for (int D : {32, 64, 128})
    for (const Shape& sh : shapes) {
      const int H = sh.H, KV = sh.KV, T = sh.T, width = (H + 2 * KV) * D;
      SplitMix64 rng{uint64_t(D * 977 + H * 13 + T)};
      std::vector<float> qkv(size_t(B) * T * width);
      for (float& v : qkv) v = float(rng.symmetric()) * 2.0f;
      const std::vector<float> ref = attention_double(qkv, B, T, T, H, KV, D);
      DeviceBuffer<float> qkv_d(qkv.size());
      cudaMemcpy(qkv_d.get(), qkv.data(), qkv.size() * 4, cudaMemcpyHostToDevice);
      const float* k = qkv_d.get() + size_t(H) * D;
      const float* v = qkv_d.get() + size_t(H + KV) * D;
      const float scale = 1.0f / std::sqrt(float(D));
      DeviceBuffer<__half> out(ref.size()), again(ref.size());
      DeviceBuffer<__nv_bfloat16> out_bf(ref.size());
      cuda::attention_prefill<__half>(qkv_d.get(), width, k, v, width, B, T, H, KV, D, scale, out.get(), nullptr);
      cuda::attention_prefill<__half>(qkv_d.get(), width, k, v, width, B, T, H, KV, D, scale, again.get(), nullptr);
      cuda::attention_prefill<__nv_bfloat16>(qkv_d.get(), width, k, v, width, B, T, H, KV, D, scale, out_bf.get(), nullptr);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> got = host_floats(out);
      EXPECT_TRUE(got == host_floats(again)) << "not deterministic, D=" << D << " T=" << T;
      const double e = test::rel_l2(got, ref), e_bf = test::rel_l2(host_floats(out_bf), ref);
      worst[0] = std::max(worst[0], e);
      worst[1] = std::max(worst[1], e_bf);
      EXPECT_LE(e, 1e-3) << "fp16 D=" << D << " H=" << H << " KV=" << KV << " T=" << T;
      EXPECT_LE(e_bf, 8e-3) << "bf16 D=" << D << " H=" << H << " KV=" << KV << " T=" << T;
    }
  std::printf("prefill attention over the forward's rows vs double: worst rel-L2 fp16 %.2e, bf16 %.2e\n", worst[0], worst[1]);
}

// The decode kernel (split over keys) and the prefill kernel over the same cache, for every cache
// format and head_dim, GQA groups of 1, 2, 3, 4 and 16 (more rows than one block takes), T = 1 ..
// 4, 2 sequences, a position inside the capacity (blocks past it exit) and one at the end; the
// position read from device memory (CUDA graphs) gives the same bits, and a second run too (no
// atomics).
TEST(GpuAttention, DecodeAndPrefillOverTheCacheMatchDouble) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  struct Shape { int H, KV, T, pos, capacity; };
  const Shape shapes[] = {{4, 4, 1, 500, 600},  {4, 2, 1, 300, 301},   {8, 2, 1, 1023, 1024}, {4, 2, 3, 2000, 4100},
                          {16, 1, 1, 777, 1000}, {6, 2, 4, 130, 134}, {8, 8, 2, 64, 66}};
  const int B = 2;
  double worst_decode = 0, worst_prefill = 0;
  for (int D : {32, 64, 128})
    for (KvMode mode : {KvMode::kFp16, KvMode::kInt8, KvMode::kInt4})
      for (const Shape& sh : shapes) {
        const CachedCase k(B, sh.H, sh.KV, D, sh.T, sh.pos, sh.capacity, mode, uint64_t(D * 131 + sh.H * 7 + sh.T));
        const cuda::KvLayer layer = k.cache.layer(0);
        const float scale = 1.0f / std::sqrt(float(D));
        DeviceBuffer<float> scratch(cuda::attention_decode_scratch_floats(B, k.T, k.H, D, sh.capacity));
        cudaMemset(scratch.get(), 0, scratch.size() * 4);
        DeviceBuffer<__half> dec(size_t(B) * k.T * k.H * D), dec2(dec.size()), dec_dev(dec.size()), pre(dec.size());
        DeviceBuffer<int> pos_d(1);
        cudaMemcpy(pos_d.get(), &k.P, 4, cudaMemcpyHostToDevice);
        cuda::attention_decode<__half>(k.q_d.get(), k.width, layer, B, k.T, k.P, nullptr, k.H, k.KV, D, scale, scratch.get(),
                                       dec.get(), nullptr);
        cuda::attention_decode<__half>(k.q_d.get(), k.width, layer, B, k.T, k.P, nullptr, k.H, k.KV, D, scale, scratch.get(),
                                       dec2.get(), nullptr);
        cuda::attention_decode<__half>(k.q_d.get(), k.width, layer, B, k.T, 0, pos_d.get(), k.H, k.KV, D, scale,
                                       scratch.get(), dec_dev.get(), nullptr);
        cuda::attention_prefill<__half>(k.q_d.get(), k.width, layer, B, k.T, k.P, nullptr, k.H, k.KV, D, scale, pre.get(),
                                        nullptr);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<float> got_dec = host_floats(dec), ref = k.reference();
        EXPECT_TRUE(got_dec == host_floats(dec2)) << "decode is not deterministic";
        EXPECT_TRUE(got_dec == host_floats(dec_dev)) << "position from device memory differs";
        const double e_dec = test::rel_l2(got_dec, ref), e_pre = test::rel_l2(host_floats(pre), ref);
        worst_decode = std::max(worst_decode, e_dec);
        worst_prefill = std::max(worst_prefill, e_pre);
        // fp16 output: 2^-11 relative rounding per value, rel-L2 about 3e-4.
        EXPECT_LE(e_dec, 1e-3) << "decode " << k.name();
        EXPECT_LE(e_pre, 1e-3) << "prefill " << k.name();
      }
  std::printf("attention over the cache vs double: worst rel-L2 decode %.3g, prefill %.3g (fp16 output)\n", worst_decode,
              worst_prefill);
}

// Prefill over the KV cache in each format, long: T new tokens after P cached ones (P not a
// multiple of the tiles, or 0).
TEST(GpuAttentionPrefill, OverTheCacheMatchesDouble) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  struct Shape { int H, KV, T, P; };
  const Shape shapes[] = {{8, 2, 100, 0}, {4, 4, 70, 37}, {6, 3, 129, 200}};
  const int B = 2;
  double worst = 0;
  for (int D : {32, 64, 128})
    for (KvMode mode : {KvMode::kFp16, KvMode::kInt8, KvMode::kInt4})
      for (const Shape& sh : shapes) {
        const CachedCase k(B, sh.H, sh.KV, D, sh.T, sh.P, sh.P + sh.T + 5, mode, uint64_t(D * 31 + sh.H * 7 + sh.T + sh.P));
        DeviceBuffer<__half> out(size_t(B) * k.T * k.H * D);
        cuda::attention_prefill<__half>(k.q_d.get(), k.width, k.cache.layer(0), B, k.T, k.P, nullptr, k.H, k.KV, D,
                                        1.0f / std::sqrt(float(D)), out.get(), nullptr);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const double e = test::rel_l2(host_floats(out), k.reference());
        worst = std::max(worst, e);
        EXPECT_LE(e, 1e-3) << k.name();
      }
  std::printf("prefill attention over the cache vs double: worst rel-L2 %.2e\n", worst);
}

namespace {

size_t cache_rows(const cuda::KvLayer& l, int B) { return size_t(B) * l.kv_heads * l.capacity; }
void clear_cache(const cuda::KvLayer& l, int B) {
  const size_t rows = cache_rows(l, B);
  cudaMemset(l.k, 0, rows * l.row_bytes());
  cudaMemset(l.v, 0, rows * l.row_bytes());
  if (l.bits < 16) {
    cudaMemset(l.k_param, 0, rows * sizeof(__half2));
    cudaMemset(l.v_param, 0, rows * sizeof(__half2));
  }
}
// A layer's cache as bytes on the host: K and V values, then their params (int8 / int4).
std::vector<uint8_t> cache_bytes(const cuda::KvLayer& l, int B) {
  const size_t rows = cache_rows(l, B), values = rows * l.row_bytes();
  const size_t params = l.bits < 16 ? rows * sizeof(__half2) : 0;
  std::vector<uint8_t> out(2 * (values + params));
  cudaMemcpy(out.data(), l.k, values, cudaMemcpyDeviceToHost);
  cudaMemcpy(out.data() + values, l.v, values, cudaMemcpyDeviceToHost);
  if (params) {
    cudaMemcpy(out.data() + 2 * values, l.k_param, params, cudaMemcpyDeviceToHost);
    cudaMemcpy(out.data() + 2 * values + params, l.v_param, params, cudaMemcpyDeviceToHost);
  }
  return out;
}

}  // namespace

// The decode kernel doing rope_append's work itself (a QkvRope given: bias, rotation of q, the new
// tokens' K and V into the cache) gives the bits of rope_append followed by the plain kernel: the
// same output and the same cache bytes, for every cache format and head_dim, with and without
// bias, whole and partial rotary, an attention scaling, T = 1 .. 4 (new tokens on both sides of a
// chunk boundary), positions from device memory, and more query rows than one block takes (there
// the host runs rope_append first).
TEST(GpuAttention, RopeInTheDecodeKernelEqualsRopeAppend) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  struct Shape { int H, KV, T, P, capacity; };
  // In the kernel: T = 1 .. 4 (T = 4: two items a warp), new tokens across a 64-key chunk
  // boundary; by rope_append first: more than 8 query rows per kv head.
  const Shape shapes[] = {{4, 4, 1, 0, 8},     {4, 2, 1, 300, 301}, {4, 2, 2, 63, 200}, {2, 2, 4, 62, 200},
                          {4, 2, 3, 63, 200}, {6, 2, 4, 126, 134}, {16, 1, 1, 77, 100}};
  const int B = 2;
  SplitMix64 rng{2024};
  for (int D : {32, 64, 128})
    for (KvMode mode : {KvMode::kFp16, KvMode::kInt8, KvMode::kInt4})
      for (const Shape& sh : shapes)
        for (int variant = 0; variant < 2; ++variant) {  // 0: bias, whole rotary; 1: no bias, half the channels
          const int width = (sh.H + 2 * sh.KV) * D, rot = variant ? D / 2 : D, bits = mode == KvMode::kFp16 ? 16 : int(mode);
          const std::string what = fmt::format("D={} {} H={} KV={} T={} P={} {}", D, kv_mode_name(mode), sh.H, sh.KV, sh.T,
                                               sh.P, variant ? "no bias, half rotary" : "bias");
          std::vector<float> prev(size_t(B) * sh.P * width + 1), fresh(size_t(B) * sh.T * width), inv_freq(size_t(rot / 2));
          for (float& v : prev) v = float(rng.symmetric()) * 2.0f;
          for (float& v : fresh) v = float(rng.symmetric()) * 2.0f;
          for (int j = 0; j < rot / 2; ++j) inv_freq[size_t(j)] = std::pow(10000.0f, -2.0f * float(j) / float(rot));
          std::vector<uint16_t> bias(static_cast<size_t>(width));
          for (auto& b : bias) b = float_to_half(0.2f * float(rng.symmetric()));
          const DeviceBuffer<float> prev_d = test::to_device(prev), freq_d = test::to_device(inv_freq);
          const DeviceBuffer<uint16_t> bias_d = test::to_device(bias);
          const cuda::QkvRope<__half> rope{variant ? nullptr : reinterpret_cast<const __half*>(bias_d.get()), freq_d.get(),
                                           1.1f, rot};
          const float scale = 1.0f / std::sqrt(float(D));
          DeviceBuffer<int> pos_d = test::to_device(std::vector<int>{sh.P});
          // Three caches with the same P tokens: rope_append + plain kernel, rope in the kernel, and
          // rope in the kernel with the position from device memory.
          cuda::KvCache caches[3];
          std::vector<float> outs[3];
          for (int run = 0; run < 3; ++run) {
            caches[run].allocate(bits, 1, B, sh.KV, D, sh.capacity);
            const cuda::KvLayer l = caches[run].layer(0);
            clear_cache(l, B);  // rows no run writes must compare equal too
            if (sh.P) cuda::kv_append(prev_d.get(), B, sh.P, sh.H, l, 0, nullptr, nullptr);
            DeviceBuffer<float> qkv = test::to_device(fresh), scratch(cuda::attention_decode_scratch_floats(B, sh.T, sh.H, D, sh.capacity));
            cudaMemset(scratch.get(), 0, scratch.size() * 4);
            DeviceBuffer<__half> out(size_t(B) * sh.T * sh.H * D);
            if (run == 0) cuda::rope_append(qkv.get(), rope, B, sh.T, sh.H, l, sh.P, nullptr, nullptr);
            cuda::attention_decode<__half>(qkv.get(), width, l, B, sh.T, run == 2 ? 0 : sh.P, run == 2 ? pos_d.get() : nullptr,
                                           sh.H, sh.KV, D, scale, scratch.get(), out.get(), nullptr,
                                           run == 0 ? cuda::QkvRope<__half>{} : rope);
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << what;
            outs[run] = host_floats(out);
          }
          const std::vector<uint8_t> want = cache_bytes(caches[0].layer(0), B);
          for (int run = 1; run < 3; ++run) {
            EXPECT_TRUE(outs[run] == outs[0]) << what << (run == 2 ? ", position from device memory" : "");
            EXPECT_TRUE(cache_bytes(caches[run].layer(0), B) == want) << what << ": cache bytes";
          }
        }
}
