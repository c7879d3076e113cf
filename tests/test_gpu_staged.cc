// The kernels that write the wgmma GEMM's input in its staged order (runtime/cuda/staged_x.cuh):
// add_rmsnorm, silu_mul and attention_prefill with `staged` must leave, in every row that exists,
// what their row-major output reordered by w4_stage_x holds (ctest label `gpu`; skips without a
// CUDA device).
// Rows past M up to the next multiple of 8 are left out: the GEMM never stores their outputs.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cuda/kernels.h"
#include "device_copy.h"
#include "gpu_model.h"
#include "splitmix64.h"

using namespace tmkit;
using test::to_device, test::to_host;
using cuda::DeviceBuffer;

namespace {

// fp16 bits as an integer that orders like the value (adjacent values differ by 1).
int ordered(__half h) {
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b & 0x8000 ? -int(b & 0x7fff) : int(b);
}

std::vector<float> random_floats(size_t n, SplitMix64& rng, double scale) {
  std::vector<float> v(n);
  for (float& f : v) f = float(rng.symmetric() * scale);
  return v;
}

// `natural` [M, K] staged by w4_stage_x, against `staged`, over rows < M: the most fp16 units in
// the last place any value differs by (0: equal bits); each channel of a row must be in one place.
int staged_ulps(const DeviceBuffer<__half>& natural, const DeviceBuffer<__half>& staged, int M, int K) {
  const size_t n = cuda::staged_rows(M) * size_t(K);
  DeviceBuffer<__half> ref(n);
  cuda::w4_stage_x(natural.get(), M, K, ref.get(), nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<__half> want = to_host(ref, n), got = to_host(staged, n);
  const std::vector<__half> rows = to_host(natural, size_t(M) * K);
  int worst = 0;
  std::vector<int> seen(static_cast<size_t>(K));
  for (int r = 0; r < M; ++r) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int u = 0; u < K / 8; ++u)
      for (int p = 0; p < 8; ++p) {
        const size_t at = cuda::staged_unit(r, u, int(cuda::staged_rows(M))) * 8 + size_t(p);
        const int c = cuda::staged_channel(u, p);
        ++seen[size_t(c)];
        // The layout's own statement: place p of unit u holds channel c of row r.
        EXPECT_EQ(ordered(want[at]), ordered(rows[size_t(r) * K + c])) << "row " << r << " channel " << c;
        worst = std::max(worst, std::abs(ordered(got[at]) - ordered(want[at])));
      }
    for (int c = 0; c < K; ++c) EXPECT_EQ(seen[size_t(c)], 1) << "channel " << c;
  }
  return worst;
}

}  // namespace

// RMSNorm's staged output: the same values as its row-major output staged, up to one unit in the
// last place (its threads hold other channels, so the sum of squares adds in another order); the
// residual stream it updates is bit-for-bit the same. Hidden 12288 takes 16 values a thread.
TEST(GpuStagedX, RmsNormWritesTheStagedOrder) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  SplitMix64 rng{77};
  for (int hidden : {512, 4096, 12288})
    for (int M : {1, 7, 17, 130}) {
      const std::vector<float> x0 = random_floats(size_t(M) * hidden, rng, 2.0), d0 = random_floats(x0.size(), rng, 1.0);
      std::vector<__half> w(static_cast<size_t>(hidden)), bias(w.size());
      for (size_t i = 0; i < w.size(); ++i) w[i] = __float2half(float(rng.symmetric())), bias[i] = __float2half(float(rng.symmetric()));
      const DeviceBuffer<__half> w_d = to_device(w), bias_d = to_device(bias);
      const DeviceBuffer<float> delta = to_device(d0);
      DeviceBuffer<float> xs[2] = {to_device(x0), to_device(x0)};
      DeviceBuffer<__half> out[2] = {DeviceBuffer<__half>(size_t(M) * hidden),
                                     DeviceBuffer<__half>(cuda::staged_rows(M) * size_t(hidden))};
      for (int staged = 0; staged < 2; ++staged)
        cuda::add_rmsnorm<__half>(xs[staged].get(), delta.get(), bias_d.get(), w_d.get(), 1e-5f, M, hidden,
                                  out[staged].get(), nullptr, staged == 1);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> x_natural = to_host(xs[0], x0.size()), x_staged = to_host(xs[1], x0.size());
      EXPECT_EQ(std::memcmp(x_natural.data(), x_staged.data(), x0.size() * 4), 0) << "hidden " << hidden << " M " << M;
      EXPECT_LE(staged_ulps(out[0], out[1], M, hidden), 1) << "hidden " << hidden << " M " << M;
    }
}

// SiLU's staged output equals its row-major output staged bit for bit (the same arithmetic per
// value), for both gate/up column orders.
TEST(GpuStagedX, SiluMulWritesTheStagedOrder) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  SplitMix64 rng{78};
  for (bool interleaved : {false, true})
    for (int I : {1536, 11008})
      for (int M : {1, 9, 24, 130}) {
        const DeviceBuffer<float> gu = to_device(random_floats(size_t(M) * 2 * I, rng, 4.0));
        DeviceBuffer<__half> natural(size_t(M) * I), staged(cuda::staged_rows(M) * size_t(I));
        cuda::silu_mul<__half>(gu.get(), M, I, interleaved, natural.get(), nullptr);
        cuda::silu_mul<__half>(gu.get(), M, I, interleaved, staged.get(), nullptr, true);
        EXPECT_EQ(staged_ulps(natural, staged, M, I), 0) << "I " << I << " M " << M << (interleaved ? " interleaved" : "");
      }
}

// Prefill attention's staged output equals its row-major output staged bit for bit, for each head
// size, several sequences (rows b T + t) and a row count that is no multiple of 8.
TEST(GpuStagedX, AttentionPrefillWritesTheStagedOrder) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  SplitMix64 rng{79};
  struct Case {
    int B, T, H, KV, D;
  };
  for (const Case& c : {Case{1, 130, 4, 2, 32}, Case{3, 45, 8, 4, 64}, Case{2, 70, 4, 4, 128}}) {
    const int width = (c.H + 2 * c.KV) * c.D, rows = c.B * c.T, K = c.H * c.D;
    const DeviceBuffer<float> qkv = to_device(random_floats(size_t(rows) * width, rng, 2.0));
    DeviceBuffer<__half> natural(size_t(rows) * K), staged(cuda::staged_rows(rows) * size_t(K));
    for (int st = 0; st < 2; ++st)
      cuda::attention_prefill<__half>(qkv.get(), size_t(width), qkv.get() + size_t(c.H) * c.D,
                                      qkv.get() + size_t(c.H + c.KV) * c.D, size_t(width), c.B, c.T, c.H, c.KV, c.D,
                                      0.125f, st ? staged.get() : natural.get(), nullptr, st == 1);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(staged_ulps(natural, staged, rows, K), 0) << "B " << c.B << " T " << c.T << " D " << c.D;
  }
}

// Widths the staged order cannot hold fail in one line naming the size.
TEST(GpuStagedX, WidthsNotMultiplesOf128AreRefused) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  DeviceBuffer<float> x(8 * 200), gu(8 * 400);
  DeviceBuffer<__half> w(200), y(8 * 200);
  EXPECT_THROW(cuda::add_rmsnorm<__half>(x.get(), nullptr, nullptr, w.get(), 1e-5f, 8, 200, y.get(), nullptr, true),
               std::exception);
  EXPECT_THROW(cuda::silu_mul<__half>(gu.get(), 8, 200, false, y.get(), nullptr, true), std::exception);
  EXPECT_THROW(cuda::attention_prefill<__half>(x.get(), 200, x.get(), x.get(), 200, 1, 8, 3, 1, 32, 1.0f, y.get(), nullptr, true),
               std::exception);
}
