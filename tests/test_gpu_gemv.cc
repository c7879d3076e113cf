// The decode GEMV kernels on their own (ctest label `gpu`; every test skips without a CUDA device):
// dense_gemv against the product in double, and both decode GEMVs' outputs (cuda::GemvOut).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>

#include "cuda/kernels.h"
#include "device_copy.h"
#include "gpu_model.h"
#include "rtn.h"
#include "splitmix64.h"
#include "w4a16_linear.h"

using namespace tmkit;
using test::to_device, test::to_host;
using cuda::DeviceBuffer;

// The fp16 decode GEMV (dense_gemv.cu) against the product in double, for every row template, K
// not a multiple of its slices and N not a multiple of its 256-column tiles, fp16 and bf16
// weights; one scratch shared by calls of different shapes, one or many slices and tiles (its
// counters must come back to 0, and no call's partials may land on them: that bug once left
// every tile but the first unwritten), and a repeated call gives the same bits (the slices add
// in a fixed order).
TEST(GpuDenseGemv, MatchesDoubleAndRepeatsBitForBit) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  SplitMix64 rng{4242};
  size_t most = 0;
  const std::pair<int, int> shapes[] = {{64, 256}, {128, 256}, {4096, 4096}, {100, 520}, {11008, 776}, {1536, 2048}};
  for (auto [K, N] : shapes) most = std::max(most, cuda::dense_gemv_scratch_floats(cuda::kDenseGemvMaxRows, K, N));
  DeviceBuffer<float> scratch(most);
  ASSERT_EQ(cudaMemset(scratch.get(), 0, most * 4), cudaSuccess);
  for (bool bf16 : {false, true})
    for (auto [K, N] : shapes)
      for (int M = 1; M <= cuda::kDenseGemvMaxRows; ++M) {
        // Values exactly representable in both types: 8 significant bits.
        auto draw = [&] { return float(std::round(rng.symmetric() * 128.0)) / 128.0f; };
        std::vector<float> w(size_t(K) * N), x(size_t(M) * K);
        for (float& v : w) v = draw();
        for (float& v : x) v = draw();
        auto bits = [&](const std::vector<float>& v) {
          std::vector<uint16_t> b(v.size());
          for (size_t i = 0; i < v.size(); ++i) {
            uint32_t u;
            std::memcpy(&u, &v[i], 4);
            b[i] = bf16 ? uint16_t(u >> 16) : float_to_half(v[i]);
          }
          return b;
        };
        const std::vector<uint16_t> wb = bits(w), xb = bits(x);
        DeviceBuffer<uint16_t> w_d(wb.size()), x_d(xb.size());
        DeviceBuffer<float> y_d(size_t(M) * N);
        cudaMemcpy(w_d.get(), wb.data(), wb.size() * 2, cudaMemcpyHostToDevice);
        cudaMemcpy(x_d.get(), xb.data(), xb.size() * 2, cudaMemcpyHostToDevice);
        std::vector<float> y[2];
        for (auto& out : y) {
          if (bf16)
            cuda::dense_gemv(reinterpret_cast<const __nv_bfloat16*>(x_d.get()), M, K, N,
                             reinterpret_cast<const __nv_bfloat16*>(w_d.get()), y_d.get(), scratch.get(), nullptr);
          else
            cuda::dense_gemv(reinterpret_cast<const __half*>(x_d.get()), M, K, N,
                             reinterpret_cast<const __half*>(w_d.get()), y_d.get(), scratch.get(), nullptr);
          out.resize(size_t(M) * N);
          ASSERT_EQ(cudaMemcpy(out.data(), y_d.get(), out.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
        }
        double num = 0, den = 0;
        for (int m = 0; m < M; ++m)
          for (int n = 0; n < N; ++n) {
            double ref = 0;
            for (int k = 0; k < K; ++k) ref += double(x[size_t(m) * K + k]) * w[size_t(k) * N + n];
            const double d = y[0][size_t(m) * N + n] - ref;
            num += d * d;
            den += ref * ref;
          }
        const double rel = std::sqrt(num / den);
        // fp32 sums of exact products: ~1e-6 of rounding over these K (a lost slice or tile: > 1e-2).
        EXPECT_LE(rel, 1e-5) << (bf16 ? "bf16 " : "fp16 ") << K << "x" << N << " M=" << M;
        EXPECT_EQ(std::memcmp(y[0].data(), y[1].data(), y[0].size() * 4), 0) << K << "x" << N << " M=" << M;
      }
}

namespace {

double rel_l2(const std::vector<double>& ref, const std::vector<float>& got) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}
// Random fp16 rows x [M, K] (as bits) and their product with w [K, N] in double.
std::vector<uint16_t> random_rows(SplitMix64& rng, int M, int K) {
  std::vector<uint16_t> x(size_t(M) * K);
  for (auto& v : x) v = float_to_half(float(rng.symmetric()));
  return x;
}
std::vector<double> product(const std::vector<uint16_t>& x, int M, int K, int N, const std::vector<double>& w) {
  std::vector<double> S(size_t(M) * N, 0.0);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) S[size_t(m) * N + n] += double(half_to_float(x[size_t(m) * K + k])) * w[size_t(k) * N + n];
  return S;
}
std::vector<float> halves_to_float(const std::vector<uint16_t>& h) {
  std::vector<float> f(h.size());
  for (size_t i = 0; i < h.size(); ++i) f[i] = half_to_float(h[i]);
  return f;
}
// Random fp16 weights [K, N] on the device, and their values in wd.
DeviceBuffer<uint16_t> random_fp16(SplitMix64& rng, int K, int N, std::vector<double>& wd) {
  std::vector<uint16_t> w(size_t(K) * N);
  wd.resize(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    w[i] = float_to_half(0.05f * float(rng.symmetric()));
    wd[i] = half_to_float(w[i]);
  }
  return to_device(w);
}
// Random weights [K, N] quantized RTN w4g128, and in dq their (q - z) s without dequantize()'s
// rounding to fp16 (the kernels apply the scales in fp32).
Int4Linear random_int4(SplitMix64& rng, int K, int N, std::vector<double>& dq) {
  std::vector<float> w(size_t(K) * N);
  for (float& v : w) v = 0.05f * float(rng.symmetric());
  const Int4Linear q = quantize_rtn(w.data(), K, N, 128);
  dq.resize(w.size());
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n) {
      const size_t g = size_t(k / 128) * N + n;
      dq[size_t(k) * N + n] = (int4_code(q, k, n) - half_to_float(q.zeros[g])) * double(half_to_float(q.scales[g]));
    }
  return q;
}

// One GEMV of M rows through `run(out)`, both outputs a decode layer uses, against double:
// plain y = x W (the fp32 sums) and gated act = silu(S gate) * S up in fp16, from the
// [8 gate | 8 up] column blocks. Each runs twice and must repeat bit for bit.
template <typename Run>
void check_outputs(const std::string& what, int M, int N, const std::vector<double>& S, Run run, double y_bar = 1e-5) {
  std::vector<double> act_ref(size_t(M) * N / 2);
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < N / 2; ++c) {
      const double g = S[size_t(m) * N + c / 8 * 16 + c % 8], u = S[size_t(m) * N + c / 8 * 16 + c % 8 + 8];
      act_ref[size_t(m) * (N / 2) + c] = g / (1.0 + std::exp(-g)) * u;
    }
  DeviceBuffer<float> y_d(S.size());
  DeviceBuffer<uint16_t> act_d(act_ref.size());
  cuda::GemvOut<__half> gated;
  gated.act = reinterpret_cast<__half*>(act_d.get());
  std::vector<float> y[2];
  std::vector<uint16_t> act[2];
  for (int rep = 0; rep < 2; ++rep) {
    run(cuda::GemvOut<__half>(y_d.get()));
    run(gated);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    y[rep] = to_host(y_d, S.size());
    act[rep] = to_host(act_d, act_ref.size());
  }
  // fp32 sums (~1e-6 here); the activation also rounds to fp16 (2^-12 relative).
  const double e_y = rel_l2(S, y[0]), e_act = rel_l2(act_ref, halves_to_float(act[0]));
  std::printf("%s M=%d: y %.2g act %.2g\n", what.c_str(), M, e_y, e_act);
  EXPECT_LE(e_y, y_bar) << what << " M=" << M;
  EXPECT_LE(e_act, 1e-3) << what << " M=" << M;
  EXPECT_EQ(y[0], y[1]) << what << " M=" << M;
  EXPECT_EQ(act[0], act[1]) << what << " M=" << M;
}

}  // namespace

// dense_gemv (fp16 weights) and w4a16_stream (int4) into both GemvOut outputs: every row template
// of each, one K slice and many (dense_gemv), one and two column pairs per unit and one and two
// blocks per SM (the stream).
TEST(GpuGemvOut, PlainAndGatedMatchDouble) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  SplitMix64 rng{99};
  for (auto [K, N] : {std::pair{64, 256}, std::pair{512, 1024}, std::pair{4096, 4096}}) {
    size_t scratch_floats = 0;
    for (int M = 1; M <= cuda::kDenseGemvMaxRows; ++M)
      scratch_floats = std::max(scratch_floats, cuda::dense_gemv_scratch_floats(M, K, N));
    DeviceBuffer<float> scratch(scratch_floats);
    ASSERT_EQ(cudaMemset(scratch.get(), 0, scratch_floats * 4), cudaSuccess);
    std::vector<double> wd;
    const DeviceBuffer<uint16_t> w_d = random_fp16(rng, K, N, wd);
    for (int M = 1; M <= cuda::kDenseGemvMaxRows; ++M) {
      const std::vector<uint16_t> x = random_rows(rng, M, K);
      const DeviceBuffer<uint16_t> x_d = to_device(x);
      check_outputs("dense_gemv " + std::to_string(K) + "x" + std::to_string(N), M, N, product(x, M, K, N, wd),
                      [&](const cuda::GemvOut<__half>& out) {
                        cuda::dense_gemv(reinterpret_cast<const __half*>(x_d.get()), M, K, N,
                                         reinterpret_cast<const __half*>(w_d.get()), out, scratch.get(), nullptr);
                      });
    }
  }
  // N = 1040: odd column pairs, the stream's one-pair template at M > 8; 32 (2 SMs + 8) columns
  // give M > 8 two blocks per SM (w4a16_stream's choice from 64 columns per SM), 96 (SMs - 4)
  // columns one round of SMs - 4 units of 6 pairs; K = 8320 (65 groups, the last chunk short) the
  // 16-consumer-warp blocks of long units.
  int sms = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  for (auto [K, N] : {std::pair{512, 1040}, std::pair{4096, 4096}, std::pair{512, 32 * (2 * sms + 8)},
                      std::pair{512, 96 * (sms - 4)}, std::pair{8320, 1024}}) {
    std::vector<double> dq;
    const W4Linear lin(random_int4(rng, K, N, dq));
    DeviceBuffer<__half> unused;
    for (int M : {1, 3, 8, 9, 16}) {
      ASSERT_TRUE(lin.streams(M));
      const std::vector<uint16_t> x = random_rows(rng, M, K);
      const DeviceBuffer<uint16_t> x_d = to_device(x);
      check_outputs("w4a16_stream " + std::to_string(K) + "x" + std::to_string(N), M, N, product(x, M, K, N, dq),
                      [&](const cuda::GemvOut<__half>& out) {
                        lin.run(nullptr, reinterpret_cast<const __half*>(x_d.get()), M, out, unused, nullptr);
                      });
    }
  }
}

namespace {

// One fold chain of M rows against double: `first(out)` runs the GEMV that ends a block into a
// GemvOut with `residual` set and returns its partials; `second(out)` the one that reads xw.
template <typename First, typename Second>
void check_fold(const std::string& what, SplitMix64& rng, int M, int K1, int hidden, int N2, const std::vector<double>& w1,
                const std::vector<double>& w2, bool with_bias, First first, Second second) {
  const float eps = 1e-5f;
  std::vector<uint16_t> norm_w(hidden), bias(hidden);
  for (auto& v : norm_w) v = float_to_half(1.0f + 0.5f * float(rng.symmetric()));
  for (auto& v : bias) v = float_to_half(with_bias ? 0.1f * float(rng.symmetric()) : 0.0f);
  const std::vector<uint16_t> X = random_rows(rng, M, K1);
  std::vector<float> x0(size_t(M) * hidden);
  for (float& v : x0) v = float(rng.symmetric());
  // The reference: x in double, then the norm as add_rmsnorm computes it, then the product.
  const std::vector<double> S1 = product(X, M, K1, hidden, w1);
  std::vector<double> x_ref(x0.size()), xw_ref(x0.size());
  std::vector<uint16_t> h(x0.size());  // rmsnorm(x) * norm_w in fp16, as add_rmsnorm writes it
  for (int m = 0; m < M; ++m) {
    double ss = 0;
    for (int n = 0; n < hidden; ++n) {
      const size_t i = size_t(m) * hidden + n;
      x_ref[i] = x0[i] + S1[i] + (with_bias ? half_to_float(bias[n]) : 0.0);
      xw_ref[i] = x_ref[i] * half_to_float(norm_w[n]);
      ss += x_ref[i] * x_ref[i];
    }
    const double inv = 1.0 / std::sqrt(ss / hidden + eps);
    for (int n = 0; n < hidden; ++n) h[size_t(m) * hidden + n] = float_to_half(float(xw_ref[size_t(m) * hidden + n] * inv));
  }
  const DeviceBuffer<uint16_t> X_d = to_device(X), norm_d = to_device(norm_w), bias_d = to_device(bias);
  DeviceBuffer<float> x_d(x0.size()), ss_d(size_t(cuda::kFoldMaxRows) * cuda::kFoldMaxParts);
  DeviceBuffer<uint16_t> xw_d(x0.size());
  std::vector<float> x_out[2];
  std::vector<uint16_t> xw_out[2];
  int reps = 0;
  check_outputs(what, M, N2, product(h, M, hidden, N2, w2),
                [&](const cuda::GemvOut<__half>& second_out) {
                  ASSERT_EQ(cudaMemcpy(x_d.get(), x0.data(), x0.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
                  cuda::GemvOut<__half> out;
                  out.residual = x_d.get();
                  out.bias = with_bias ? reinterpret_cast<const __half*>(bias_d.get()) : nullptr;
                  out.norm_w = reinterpret_cast<const __half*>(norm_d.get());
                  out.xw = reinterpret_cast<__half*>(xw_d.get());
                  out.ss = ss_d.get();
                  const int parts = first(reinterpret_cast<const __half*>(X_d.get()), out);
                  cuda::GemvOut<__half> reading = second_out;
                  reading.fold_in = {ss_d.get(), parts, eps};
                  second(reinterpret_cast<const __half*>(xw_d.get()), reading);
                  if (!reading.act || reps >= 2) return;
                  x_out[reps] = to_host(x_d, x0.size());
                  xw_out[reps++] = to_host(xw_d, x0.size());
                },
                // The reading GEMV's input is x * norm_w, not the normed row, in fp16: another
                // rounding (2^-12 relative) than the reference's, ~1e-4 over a sum.
                5e-4);
  ASSERT_EQ(reps, 2);
  // x: fp32 sums (~1e-6); xw: x * norm_w rounded to fp16 (2^-12 relative).
  EXPECT_LE(rel_l2(x_ref, x_out[0]), 1e-5) << what << ": x, M=" << M;
  EXPECT_LE(rel_l2(xw_ref, halves_to_float(xw_out[0])), 1e-3) << what << ": xw, M=" << M;
  EXPECT_EQ(x_out[0], x_out[1]) << what << " M=" << M;
  EXPECT_EQ(xw_out[0], xw_out[1]) << what << " M=" << M;
}

}  // namespace

// The RMSNorm folded across two decode GEMVs (cuda::GemvOut::residual and fold_in) against double:
// x += X W1 (+ bias) in place, xw = x * norm_w in fp16, then the reading GEMV's plain sums and
// gated activation of rmsnorm(x) * norm_w, at every row count the fold takes; each chain runs
// twice from the same x and must repeat bit for bit (the partials add in a fixed order). int4:
// the first linear on the 16-warp stream shape (K = 8320: long units, few) and on the 8-warp one
// (K = 512, with a bias); fp16: dense_gemv, one K slice and many.
TEST(GpuNormFold, MatchesNormThenGemvInDouble) {
  if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  SplitMix64 rng{2027};
  DeviceBuffer<__half> unused;
  for (auto [K1, hidden, N2, with_bias] : {std::tuple{8320, 1024, 2048, false}, std::tuple{512, 4096, 1024, true}}) {
    std::vector<double> dq1, dq2;
    const W4Linear w1(random_int4(rng, K1, hidden, dq1)), w2(random_int4(rng, hidden, N2, dq2));
    for (int M = 1; M <= cuda::kFoldMaxRows; ++M) {
      ASSERT_TRUE(w1.streams(M) && w2.streams(M));
      check_fold("int4 fold " + std::to_string(K1) + "x" + std::to_string(hidden) + " -> " + std::to_string(N2), rng, M,
                 K1, hidden, N2, dq1, dq2, with_bias,
                 [&](const __half* X, const cuda::GemvOut<__half>& out) { return w1.run(nullptr, X, M, out, unused, nullptr); },
                 [&](const __half* xw, const cuda::GemvOut<__half>& out) { w2.run(nullptr, xw, M, out, unused, nullptr); });
    }
  }
  for (auto [K1, hidden, N2] : {std::tuple{11008, 4096, 1024}, std::tuple{256, 1024, 2048}}) {
    std::vector<double> wd1, wd2;
    const DeviceBuffer<uint16_t> w1 = random_fp16(rng, K1, hidden, wd1), w2 = random_fp16(rng, hidden, N2, wd2);
    const size_t floats = std::max(cuda::dense_gemv_scratch_floats(cuda::kFoldMaxRows, K1, hidden),
                                   cuda::dense_gemv_scratch_floats(cuda::kFoldMaxRows, hidden, N2));
    DeviceBuffer<float> scratch(floats);
    ASSERT_EQ(cudaMemset(scratch.get(), 0, floats * 4), cudaSuccess);
    for (int M = 1; M <= cuda::kFoldMaxRows; ++M)
      check_fold("dense fold " + std::to_string(K1) + "x" + std::to_string(hidden) + " -> " + std::to_string(N2), rng, M,
                 K1, hidden, N2, wd1, wd2, true,
                 [&](const __half* X, const cuda::GemvOut<__half>& out) {
                   return cuda::dense_gemv(X, M, K1, hidden, reinterpret_cast<const __half*>(w1.get()), out, scratch.get(), nullptr);
                 },
                 [&](const __half* xw, const cuda::GemvOut<__half>& out) {
                   cuda::dense_gemv(xw, M, hidden, N2, reinterpret_cast<const __half*>(w2.get()), out, scratch.get(), nullptr);
                 });
  }
}
