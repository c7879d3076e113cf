// W4A16: Y[M, N] (fp32) = X[M, K] (fp16) * W[K, N], W in TurboMind's v0.6 int4 layout (see
// formats/int4.h): qweight int32 [K, N/8] with column 8w + j at bits 4j of word w, fp16 scales
// and integer zeros [K/g, N], w = (q - zero) * scale (rounded to fp16, as the reference).
//
// M <= 16 (decode): dequantize on the fly. Grid (ceil(N/8 / 128), K / 128): a block covers 128
// word columns (1024 outputs) and one 128-row chunk of K; thread t owns word column w: per row it
// reads one 4-byte word (a warp reads 128 contiguous bytes), unpacks 8 codes and multiplies them
// with the chunk's X values from shared memory ([M][128] fp32). Each chunk writes its partial
// sums to partial[chunk][M][N]; a second kernel adds the chunks in order (deterministic, no
// atomics). M > 16 (prefill): dequantize W to fp16 once, then the caller's dense GEMM.
#include "kernels.h"

namespace tmkit::cuda {

namespace {

constexpr int kThreads = 128, kChunk = 128;

template <int MT>
__global__ void __launch_bounds__(kThreads) w4a16_gemv_kernel(const __half* x, int M, int K, int N, const int32_t* qw,
                                                             const __half* scales, const __half* zeros, int group,
                                                             float* partial) {
  __shared__ float xs[MT][kChunk];
  const int k0 = blockIdx.y * kChunk, words = N / 8;
  for (int i = threadIdx.x; i < MT * kChunk; i += kThreads) {
    const int m = i / kChunk, kk = i % kChunk;
    xs[m][kk] = m < M ? __half2float(x[size_t(m) * K + k0 + kk]) : 0.0f;
  }
  __syncthreads();
  const int w = blockIdx.x * kThreads + threadIdx.x;
  if (w >= words) return;
  float acc[MT][8] = {};
  float s[8], z[8];
  int loaded_group = -1;
  for (int kk = 0; kk < kChunk; ++kk) {
    const int k = k0 + kk;
    if (k / group != loaded_group) {
      loaded_group = k / group;
      const size_t g = size_t(loaded_group) * N + size_t(w) * 8;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        s[j] = __half2float(scales[g + j]);
        z[j] = __half2float(zeros[g + j]);
      }
    }
    const uint32_t word = uint32_t(qw[size_t(k) * words + w]);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float wv = __half2float(__float2half_rn((float((word >> (4 * j)) & 0xfu) - z[j]) * s[j]));
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[m][j] += xs[m][kk] * wv;
    }
  }
  for (int m = 0; m < M && m < MT; ++m) {
    float* out = partial + (size_t(blockIdx.y) * M + m) * N + size_t(w) * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = acc[m][j];
  }
}

__global__ void sum_chunks_kernel(const float* partial, int chunks, int MN, float* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= MN) return;
  float v = 0.0f;
  for (int c = 0; c < chunks; ++c) v += partial[size_t(c) * MN + i];
  y[i] = v;
}

__global__ void w4_dequant_kernel(const int32_t* qw, const __half* scales, const __half* zeros, int K, int N, int group,
                                  __half* w) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;  // one word: 8 outputs
  const size_t words = size_t(N) / 8;
  if (i >= size_t(K) * words) return;
  const size_t k = i / words, c = (i % words) * 8, g = (k / group) * N + c;
  const uint32_t word = uint32_t(qw[i]);
#pragma unroll
  for (int j = 0; j < 8; ++j)
    w[k * N + c + j] = __float2half_rn((float((word >> (4 * j)) & 0xfu) - __half2float(zeros[g + j])) * __half2float(scales[g + j]));
}

}  // namespace

void w4a16_gemv(const __half* x, int M, int K, int N, const int32_t* qw, const __half* scales, const __half* zeros,
                int group, float* partial, float* y, cudaStream_t s) {
  if (M < 1 || M > 16 || K % kChunk || N % 8 || group % 8) fail("w4a16_gemv: unsupported shape M={} K={} N={} g={}", M, K, N, group);
  const dim3 grid((N / 8 + kThreads - 1) / kThreads, K / kChunk);
  if (M == 1) w4a16_gemv_kernel<1><<<grid, kThreads, 0, s>>>(x, M, K, N, qw, scales, zeros, group, partial);
  else if (M <= 4) w4a16_gemv_kernel<4><<<grid, kThreads, 0, s>>>(x, M, K, N, qw, scales, zeros, group, partial);
  else w4a16_gemv_kernel<16><<<grid, kThreads, 0, s>>>(x, M, K, N, qw, scales, zeros, group, partial);
  TMKIT_CUDA_LAUNCHED();
  const int MN = M * N;
  sum_chunks_kernel<<<(MN + 255) / 256, 256, 0, s>>>(partial, K / kChunk, MN, y);
  TMKIT_CUDA_LAUNCHED();
}

void w4_dequant(const int32_t* qw, const __half* scales, const __half* zeros, int K, int N, int group, __half* w,
                cudaStream_t s) {
  const size_t words = size_t(K) * N / 8;
  w4_dequant_kernel<<<unsigned((words + 255) / 256), 256, 0, s>>>(qw, scales, zeros, K, N, group, w);
  TMKIT_CUDA_LAUNCHED();
}

}  // namespace tmkit::cuda
