// bench-kernels: W4A16 against the bandwidth ceiling and cuBLAS fp16, measured in one run.
//   ceiling  a device-to-device copy (bytes read + written per second)
//   W4A16    tmkit's int4 products: the streaming kernel (w4a16_stream.cu, M <= 16), the split-K
//            GEMV (w4a16_gemv.cu, M <= 32) and the tiled GEMM (w4a16_gemm.cu) in both of their
//            block shapes, the wgmma GEMM (w4a16_wgmma.cu, M > 16), and dequantize + cuBLAS
//   cuBLAS   the same product with dense fp16 weights
//   floor    a kernel that only reads the W4A16 product's bytes (read_floor.cu), launched alike
// Weights rotate over enough copies to exceed L2, so every run streams them from HBM. CUDA
// events; median of the repetitions. See README.md beside this file.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cuda/cuda_utils.h"
#include "cuda/kernels.h"
#include "error.h"
#include "read_floor.h"

using tmkit::cuda::DeviceBuffer;

namespace {

// Median time of one call, from CUDA-graph replays of kBatch calls: back-to-back launches, so
// the host's launch latency does not pad the times of small kernels.
constexpr int kBatch = 20;

template <typename F>
double median_ms(int reps, F&& f) {
  cudaStream_t stream;
  TMKIT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (int i = 0; i < 3; ++i) f(i, stream);  // warm-up, handles
  TMKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  TMKIT_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kBatch; ++i) f(i, stream);
  TMKIT_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  TMKIT_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  TMKIT_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  std::vector<float> ms;
  for (int i = 0; i < std::max(1, reps / kBatch + 3); ++i) {
    cudaEventRecord(a, stream);
    TMKIT_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    cudaEventRecord(b, stream);
    TMKIT_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t / kBatch);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

template <typename F>
double median_ms_plain(int reps, F&& f) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) f(i);  // warm-up
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a);
    f(i);
    cudaEventRecord(b);
    TMKIT_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

std::string fmt_us(double ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", ms * 1e3);
  return buf;
}

template <typename T>
void fill_random(DeviceBuffer<T>& buf, size_t n, uint32_t seed) {  // no zeros: they hide bugs and run fast
  std::vector<T> h(n);
  uint32_t s = seed * 2654435761u + 1;
  for (auto& v : h) {
    s ^= s << 13, s ^= s >> 17, s ^= s << 5;
    if constexpr (std::is_same_v<T, __half>) v = __float2half(float(int(s % 2001) - 1000) / 20000.0f);
    else v = T(s);
  }
  buf.resize(n);
  TMKIT_CUDA_CHECK(cudaMemcpy(buf.get(), h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
}

// ||got - ref|| / ||ref|| (NaN when either holds a NaN, so that it fails every bound).
double rel_l2(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) num += double(got[i] - ref[i]) * (got[i] - ref[i]), den += double(ref[i]) * ref[i];
  return std::sqrt(num / den);
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 50;
  std::vector<int> ms = {1, 4, 16, 32, 128, 512};
  int gemm_rows = 512;
  std::vector<std::string> only;  // --shape KxN
  CLI::App app{"bench-kernels: W4A16 GEMV/GEMM vs copy bandwidth and cuBLAS fp16 (Llama-2-7B shapes)"};
  app.add_option("-r,--reps", reps, "timed repetitions per case (median reported)");
  app.add_option("-m,--batch", ms, "rows of the activation matrix");
  app.add_option("--gemm-rows", gemm_rows, "rows of the dense fp16 GEMM ceiling (prefill: the prompt length)");
  app.add_option("--shape", only, "only these W4A16 shapes, as KxN (e.g. 4096x4096; for profiling one)");
  CLI11_PARSE(app, argc, argv);
  const std::pair<int, int> shapes[] = {{4096, 12288}, {4096, 4096}, {4096, 22016}, {11008, 4096}};
  auto name = [](std::pair<int, int> s) { return std::to_string(s.first) + "x" + std::to_string(s.second); };
  for (const std::string& v : only)
    if (std::none_of(std::begin(shapes), std::end(shapes), [&](auto sh) { return name(sh) == v; })) {
      std::string known;
      for (auto sh : shapes) known += " " + name(sh);
      std::fprintf(stderr, "bench-kernels: --shape %s is not one of the benchmark's shapes:%s\n", v.c_str(), known.c_str());
      return 2;
    }
  try {
    cudaDeviceProp prop{};
    TMKIT_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    const size_t l2 = size_t(prop.l2CacheSize);
    bool failed = false;  // a kernel variant gave another result

    // Ceiling: a 2 GiB device-to-device copy.
    const size_t copy_bytes = size_t(1) << 31;
    DeviceBuffer<char> src(copy_bytes), dst(copy_bytes);
    TMKIT_CUDA_CHECK(cudaMemset(src.get(), 1, copy_bytes));
    const double copy_ms = median_ms_plain(10, [&](int) { cudaMemcpyAsync(dst.get(), src.get(), copy_bytes, cudaMemcpyDeviceToDevice); });
    const double copy_gbs = 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9;

    cublasHandle_t blas;
    TMKIT_CUBLAS_CHECK(cublasCreate(&blas));
    std::printf("device: %s, L2 %zu MB; device-to-device copy %.0f GB/s (read + write)\n", prop.name, l2 >> 20, copy_gbs);
    std::printf("| K x N | M | stream us (chosen / other warps / 4 stages) | gemv us (v0 / v1) | gemm us (v0 / v1) | wgmma us (staged x / + staging) | dequant+cuBLAS us | best W4A16 GB/s | %% of copy | "
                "read floor us | %% of floor | cuBLAS fp16 us | W4A16 speedup | dense GEMV us | vs cuBLAS |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (auto [K, N] : shapes) {
      if (!only.empty() && std::find(only.begin(), only.end(), name({K, N})) == only.end()) continue;
      const size_t w4_bytes = size_t(K) * N / 2 + 2 * size_t(K / 128) * N * 2, dense_bytes = size_t(K) * N * 2;
      const int copies = int(std::max<size_t>(2, 3 * l2 / w4_bytes + 1)), dense_copies = int(std::max<size_t>(2, 3 * l2 / dense_bytes + 1));
      std::vector<DeviceBuffer<uint32_t>> qw(static_cast<size_t>(copies)), sz(static_cast<size_t>(copies));
      std::vector<DeviceBuffer<__half>> sc(static_cast<size_t>(copies)), zr(static_cast<size_t>(copies)),
          dense(static_cast<size_t>(dense_copies));
      for (int c = 0; c < copies; ++c) {
        fill_random(qw[size_t(c)], size_t(K) * N / 8, uint32_t(c + 1));
        fill_random(sc[size_t(c)], size_t(K / 128) * N, uint32_t(c + 7));
        fill_random(zr[size_t(c)], size_t(K / 128) * N, uint32_t(c + 9));
        sz[size_t(c)].resize(size_t(K / 128) * N);
        tmkit::cuda::w4_pack_scale_zero(sc[size_t(c)].get(), zr[size_t(c)].get(), K, N, sz[size_t(c)].get(), nullptr);
      }
      for (int c = 0; c < dense_copies; ++c) fill_random(dense[size_t(c)], size_t(K) * N, uint32_t(c + 3));
      DeviceBuffer<__half> scratch(size_t(K) * N);
      std::vector<DeviceBuffer<char>> raw(static_cast<size_t>(copies));
      for (auto& r : raw) r.resize(w4_bytes);
      DeviceBuffer<uint32_t> sink(size_t(4 * tmkit::cuda::sm_count()));
      const double floor_ms = median_ms(reps, [&](int i, cudaStream_t st) {
        read_floor(raw[size_t(i % copies)].get(), w4_bytes / 16 * 16, sink.get(), st);
      });
      for (int M : ms) {
        DeviceBuffer<__half> x;
        fill_random(x, size_t(M) * K, 5);
        DeviceBuffer<float> y(size_t(M) * N);
        const float one = 1.0f, zero = 0.0f;
        auto time_w4 = [&](auto&& kernel) {
          return median_ms(reps, [&](int i, cudaStream_t st) {
            const size_t c = size_t(i % copies);
            kernel(qw[c].get(), sc[c].get(), zr[c].get(), st);
          });
        };
        const double inf = 1e30;
        constexpr int kStreamVariants = 3;  // w4a16_stream's `variant`
        double stream_ms[kStreamVariants] = {inf, inf, inf}, gemv_ms[2] = {inf, inf}, gemm_ms[2] = {inf, inf};
        // The streaming kernel must give the split-K GEMV's result (same arithmetic, other order; the
        // random zeros here are not integers, so the dequantized product is no reference).
        auto host_y = [&] {
          std::vector<float> h(size_t(M) * N);
          TMKIT_CUDA_CHECK(cudaMemcpy(h.data(), y.get(), h.size() * 4, cudaMemcpyDeviceToHost));
          return h;
        };
        std::vector<float> ref;
        bool wrong[kStreamVariants] = {};
        if (M <= 16) {
          tmkit::cuda::w4a16_gemv(x.get(), M, K, N, qw[0].get(), sc[0].get(), zr[0].get(), y.get(), nullptr);
          ref = host_y();
        }
        for (int v = 0; v < kStreamVariants && M <= 16; ++v) {
          TMKIT_CUDA_CHECK(cudaMemset(y.get(), 0, size_t(M) * N * 4));
          tmkit::cuda::w4a16_stream(x.get(), M, K, N, qw[0].get(), sz[0].get(), y.get(), nullptr, v);
          const double rel = rel_l2(host_y(), ref);
          wrong[v] = !(rel <= 1e-5);
          if (wrong[v]) {
            std::fprintf(stderr, "bench-kernels: w4a16_stream variant %d differs from w4a16_gemv at %d x %d, M = %d: rel-L2 %.3g\n",
                         v, K, N, M, rel);
            failed = true;
          }
        }
        for (int v = 0; v < kStreamVariants && M <= 16; ++v)
          if (!wrong[v]) stream_ms[v] = median_ms(reps, [&](int i, cudaStream_t st) {
            const size_t c = size_t(i % copies);
            tmkit::cuda::w4a16_stream(x.get(), M, K, N, qw[c].get(), sz[c].get(), y.get(), st, v);
          });
        for (int v = 0; v < 2; ++v) {
          if (M <= 32)
            gemv_ms[v] = time_w4([&](const uint32_t* q, const __half* s, const __half* z, cudaStream_t st) {
              tmkit::cuda::w4a16_gemv(x.get(), M, K, N, q, s, z, y.get(), st, v);
            });
          gemm_ms[v] = time_w4([&](const uint32_t* q, const __half* s, const __half* z, cudaStream_t st) {
            tmkit::cuda::w4a16_gemm(x.get(), M, K, N, q, s, z, y.get(), st, v);
          });
        }
        // The wgmma GEMM must give the mma.sync GEMM's result (the same fp16 weights; other order).
        // Timed on x already staged (as tm-eval's RMSNorm and SiLU kernels write it for the
        // linears after them) and with w4_stage_x ahead of it (as for the attention output).
        double wgmma_ms[2] = {inf, inf};
        bool wgmma_wrong = false;
        if (M > 16) {
          DeviceBuffer<__half> x_staged(tmkit::cuda::staged_rows(M) * size_t(K));
          tmkit::cuda::w4a16_gemm(x.get(), M, K, N, qw[0].get(), sc[0].get(), zr[0].get(), y.get(), nullptr);
          ref = host_y();
          TMKIT_CUDA_CHECK(cudaMemset(y.get(), 0, size_t(M) * N * 4));
          tmkit::cuda::w4_stage_x(x.get(), M, K, x_staged.get(), nullptr);
          tmkit::cuda::w4a16_wgmma(x_staged.get(), M, K, N, qw[0].get(), sz[0].get(), y.get(), nullptr);
          const double rel = rel_l2(host_y(), ref);
          wgmma_wrong = !(rel <= 1e-4);  // fp32 sums of K = 11008 terms in another order: ~1e-5
          if (wgmma_wrong) {
            std::fprintf(stderr, "bench-kernels: w4a16_wgmma differs from w4a16_gemm at %d x %d, M = %d: rel-L2 %.3g\n", K,
                         N, M, rel);
            failed = true;
          } else {
            for (int staging = 0; staging < 2; ++staging)
              wgmma_ms[staging] = median_ms(reps, [&](int i, cudaStream_t st) {
                const size_t c = size_t(i % copies);
                if (staging) tmkit::cuda::w4_stage_x(x.get(), M, K, x_staged.get(), st);
                tmkit::cuda::w4a16_wgmma(x_staged.get(), M, K, N, qw[c].get(), sz[c].get(), y.get(), st);
              });
          }
        }
        const double dequant_ms = time_w4([&](const uint32_t* q, const __half* s, const __half* z, cudaStream_t st) {
          tmkit::cuda::w4_dequant_packed(q, s, z, K, N, scratch.get(), st);
          cublasSetStream(blas, st);
          cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, scratch.get(), CUDA_R_16F, N, x.get(), CUDA_R_16F,
                       K, &zero, y.get(), CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        });
        const double w4_ms = std::min({stream_ms[0], stream_ms[1], stream_ms[2], gemv_ms[0], gemv_ms[1], gemm_ms[0], gemm_ms[1], wgmma_ms[0], dequant_ms});
        const double blas_ms = median_ms(reps, [&](int i, cudaStream_t st) {
          cublasSetStream(blas, st);
          cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, dense[size_t(i % dense_copies)].get(), CUDA_R_16F, N,
                       x.get(), CUDA_R_16F, K, &zero, y.get(), CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        });
        // tm-eval's fp16 decode GEMV (dense_gemv.cu), checked against cuBLAS on the same weights.
        double dense_ms = inf;
        if (M <= tmkit::cuda::kDenseGemvMaxRows) {
          DeviceBuffer<float> gemv_scratch(tmkit::cuda::dense_gemv_scratch_floats(M, K, N));
          TMKIT_CUDA_CHECK(cudaMemset(gemv_scratch.get(), 0, gemv_scratch.size() * 4));
          cublasSetStream(blas, nullptr);
          cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, dense[0].get(), CUDA_R_16F, N, x.get(), CUDA_R_16F,
                       K, &zero, y.get(), CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
          const std::vector<float> blas_y = host_y();
          TMKIT_CUDA_CHECK(cudaMemset(y.get(), 0, size_t(M) * N * 4));
          tmkit::cuda::dense_gemv(x.get(), M, K, N, dense[0].get(), y.get(), gemv_scratch.get(), nullptr);
          const double rel = rel_l2(host_y(), blas_y);
          if (rel <= 1e-5) {
            dense_ms = median_ms(reps, [&](int i, cudaStream_t st) {
              tmkit::cuda::dense_gemv(x.get(), M, K, N, dense[size_t(i % dense_copies)].get(), y.get(), gemv_scratch.get(), st);
            });
          } else {
            std::fprintf(stderr, "bench-kernels: dense_gemv differs from cuBLAS at %d x %d, M = %d: rel-L2 %.3g\n", K, N, M,
                         rel);
            failed = true;
          }
        }
        TMKIT_CUDA_CHECK(cudaDeviceSynchronize());
        const double bytes = double(w4_bytes) + 2.0 * M * K + 4.0 * M * N;
        const double gbs = bytes / (w4_ms * 1e-3) / 1e9;
        auto us = [](double t) { return t >= 1e29 ? std::string("-") : fmt_us(t); };
        auto stream_us = [&](int v) { return wrong[v] ? std::string("wrong") : us(stream_ms[v]); };
        std::printf("| %d x %d | %d | %s / %s / %s | %s / %s | %s / %s | %s | %s | %.0f | %.0f%% | %.1f | %.0f%% | %.1f | %.2fx | %s | %s |\n", K, N, M,
                    stream_us(0).c_str(), stream_us(1).c_str(), stream_us(2).c_str(), us(gemv_ms[0]).c_str(), us(gemv_ms[1]).c_str(), us(gemm_ms[0]).c_str(), us(gemm_ms[1]).c_str(),
                    wgmma_wrong ? "wrong" : (us(wgmma_ms[0]) + " / " + us(wgmma_ms[1])).c_str(), us(dequant_ms).c_str(), gbs, 100 * gbs / copy_gbs, floor_ms * 1e3, 100 * floor_ms / w4_ms, blas_ms * 1e3,
                    blas_ms / w4_ms, us(dense_ms).c_str(),
                    dense_ms < inf ? fmt::format("{:.2f}x", blas_ms / dense_ms).c_str() : "-");
      }
    }

    // Dense fp16 GEMM ceiling for prefill: cuBLAS on the decoder's four linears at M = gemm_rows,
    // fp32 output as tm-eval uses; the "layer mix" row weighs the shapes as one layer does.
    std::printf("\n| K x N | M | cuBLAS fp16 us | TFLOP/s |\n|---|---|---|---|\n");
    double flops_all = 0, ms_all = 0;
    for (auto [K, N] : shapes) {
      DeviceBuffer<__half> w, x;
      fill_random(w, size_t(K) * N, 11);
      fill_random(x, size_t(gemm_rows) * K, 13);
      DeviceBuffer<float> y(size_t(gemm_rows) * N);
      const float one = 1.0f, zero = 0.0f;
      const double t = median_ms(reps, [&](int, cudaStream_t st) {
        cublasSetStream(blas, st);
        cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, N, gemm_rows, K, &one, w.get(), CUDA_R_16F, N, x.get(), CUDA_R_16F, K,
                     &zero, y.get(), CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      });
      const double flops = 2.0 * gemm_rows * K * N;
      flops_all += flops;
      ms_all += t;
      std::printf("| %d x %d | %d | %.1f | %.0f |\n", K, N, gemm_rows, t * 1e3, flops / (t * 1e-3) / 1e12);
    }
    std::printf("| layer mix | %d | %.1f | %.0f |\n", gemm_rows, ms_all * 1e3, flops_all / (ms_all * 1e-3) / 1e12);
    cublasDestroy(blas);
    return failed ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench-kernels: error: %s\n", e.what());
    return 1;
  }
}
