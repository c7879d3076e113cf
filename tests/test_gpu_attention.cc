// The prefill attention kernel on its own (ctest label `gpu`; skips without a CUDA device): long
// inputs over the forward's own fp32 rows and over every cache format, against attention in
// double. (test_gpu.cc checks it beside the decode kernel at T <= 4, and inside whole forwards.)
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cmath>

#include "cuda/kernels.h"
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

// Over the KV cache in each format: T new tokens after P cached ones (P not a multiple of the
// tiles, or 0), the reference over the values the cache holds.
TEST(GpuAttentionPrefill, OverTheCacheMatchesDouble) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  struct Shape { int H, KV, T, P; };
  const Shape shapes[] = {{8, 2, 100, 0}, {4, 4, 70, 37}, {6, 3, 129, 200}};
  const int B = 2;
  double worst = 0;
  for (int D : {32, 64, 128})
    for (KvMode mode : {KvMode::kFp16, KvMode::kInt8, KvMode::kInt4})
      for (const Shape& sh : shapes) {
        const int H = sh.H, KV = sh.KV, T = sh.T, P = sh.P, N = P + T, width = (H + 2 * KV) * D;
        SplitMix64 rng{uint64_t(D * 31 + H * 7 + T + P)};
        std::vector<float> all(size_t(B) * N * width);
        for (float& v : all) v = float(rng.symmetric()) * 2.0f;
        std::vector<float> q(size_t(B) * T * width);  // the last T rows of each sequence
        for (int b = 0; b < B; ++b)
          std::copy_n(all.begin() + (size_t(b) * N + P) * width, size_t(T) * width, q.begin() + size_t(b) * T * width);
        DeviceBuffer<float> all_d(all.size()), q_d(q.size());
        cudaMemcpy(all_d.get(), all.data(), all.size() * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(q_d.get(), q.data(), q.size() * 4, cudaMemcpyHostToDevice);
        cuda::KvCache cache;
        cache.allocate(mode == KvMode::kFp16 ? 16 : int(mode), 1, B, KV, D, N + 5);
        const cuda::KvLayer layer = cache.layer(0);
        cuda::kv_append(all_d.get(), B, N, H, layer, 0, nullptr, nullptr);
        DeviceBuffer<__half> out(size_t(B) * T * H * D);
        cuda::attention_prefill<__half>(q_d.get(), width, layer, B, T, P, nullptr, H, KV, D, 1.0f / std::sqrt(float(D)),
                                        out.get(), nullptr);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        for (size_t r = 0; r < size_t(B) * N; ++r)
          for (int h = 0; h < 2 * KV; ++h) kv_cache_roundtrip(all.data() + r * width + (H + h) * D, D, mode);
        const double e = test::rel_l2(host_floats(out), attention_double(all, B, N, T, H, KV, D));
        worst = std::max(worst, e);
        EXPECT_LE(e, 1e-3) << "D=" << D << " " << kv_mode_name(mode) << " H=" << H << " KV=" << KV << " T=" << T << " P=" << P;
      }
  std::printf("prefill attention over the cache vs double: worst rel-L2 %.2e\n", worst);
}
