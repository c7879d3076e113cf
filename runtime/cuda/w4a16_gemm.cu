// W4A16: Y[M, N] (fp32) = X[M, K] (fp16) * W[K, N], W in TurboMind's v0.6 int4 layout (see
// formats/int4.h): qweight int32 [K, N/8] with column 8w + j at bits 4j of word w, fp16 scales
// and integer zeros [K/g, N], w = (q - zero) * scale (rounded to fp16, as the reference).
//
// M <= 16 (decode), one launch. Grid (N / (64 W 8), K / 128): a block covers 64 column lanes
// times W words (8 W output columns each) and one 128-row chunk of K, which is one quantization
// group. Its 256 threads are 4 row lanes x 64 column lanes: thread (r, c) reads rows r, r + 4, ...
// of the chunk, W consecutive words per row (16 bytes when W = 4: a warp streams 512 contiguous
// bytes per row), with 8 rows of loads in flight before the arithmetic uses them. Within a group
// scale s and zero z are per column, so the thread accumulates sum_k x_k q_k over raw codes and
// the group is applied once: y = s (sum x q - z sum x). Row lanes meet in shared memory; each
// chunk writes partial[chunk][m][n]; the last block to finish a column tile (a ticket counter)
// adds the chunks in order: deterministic, no atomics on values, no second launch.
// M > 16 (prefill): dequantize W to fp16 once, then the caller's dense GEMM.
#include "kernels.h"

namespace tmkit::cuda {

namespace {

constexpr int kChunk = 128, kColLanes = 64, kRowLanes = 4, kThreads = kColLanes * kRowLanes, kInFlight = 8;

template <int W>
struct Words;  // W consecutive int32 words loaded at once
template <> struct Words<1> { using type = int; };
template <> struct Words<2> { using type = int2; };
template <> struct Words<4> { using type = int4; };

template <int W>
__device__ inline uint32_t word_at(const typename Words<W>::type& v, int i) {
  if constexpr (W == 1) return uint32_t(v);
  else if constexpr (W == 2) return uint32_t(i == 0 ? v.x : v.y);
  else return uint32_t(i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w);
}

template <int MT, int W>
__global__ void __launch_bounds__(kThreads) w4a16_gemv_kernel(const __half* __restrict__ x, int M, int K, int N,
                                                             const int32_t* __restrict__ qw, const __half* __restrict__ scales,
                                                             const __half* __restrict__ zeros, float* partial,
                                                             unsigned* tickets, float* __restrict__ y) {
  constexpr int C = 8 * W;  // output columns per thread
  __shared__ float xs[MT][kChunk];
  __shared__ float xsum[MT];
  __shared__ float red[MT][C][kColLanes];  // row lanes 1..3 add into it in turn (static smem stays < 48 KB)
  __shared__ bool last;
  const int cl = threadIdx.x % kColLanes, rl = threadIdx.x / kColLanes;
  const int k0 = blockIdx.y * kChunk, words = N / 8;
  const int w0 = (blockIdx.x * kColLanes + cl) * W;  // first word of this thread
  for (int i = threadIdx.x; i < MT * kChunk; i += kThreads) {
    const int m = i / kChunk, kk = i % kChunk;
    xs[m][kk] = m < M ? __half2float(x[size_t(m) * K + k0 + kk]) : 0.0f;
  }
  __syncthreads();
  if (threadIdx.x < MT) {
    float t = 0.0f;
    for (int kk = 0; kk < kChunk; ++kk) t += xs[threadIdx.x][kk];
    xsum[threadIdx.x] = t;
  }
  const bool active = w0 < words;
  float acc[MT][C];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < C; ++c) acc[m][c] = 0.0f;
  if (active) {
    using V = typename Words<W>::type;
    const V* base = reinterpret_cast<const V*>(qw + size_t(k0) * words + w0);
    const size_t stride = size_t(words) / W;  // in V units per row
    for (int r0 = rl; r0 < kChunk; r0 += kRowLanes * kInFlight) {
      V v[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) v[u] = __ldg(base + size_t(r0 + u * kRowLanes) * stride);
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int kk = r0 + u * kRowLanes;
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const uint32_t word = word_at<W>(v[u], i);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            // 0x4B000000 | q is the float 2^23 + q: no int-to-float conversion (a quarter-rate
            // instruction that bounded v2 of this kernel), one logic op and one add.
            const float q = __int_as_float(int(0x4B000000u | ((word >> (4 * j)) & 0xfu))) - 8388608.0f;
#pragma unroll
            for (int m = 0; m < MT; ++m) acc[m][8 * i + j] += xs[m][kk] * q;
          }
        }
      }
    }
  }
  for (int r = 1; r < kRowLanes; ++r) {
    if (rl == r) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int c = 0; c < C; ++c) red[m][c][cl] = (r == 1 ? 0.0f : red[m][c][cl]) + acc[m][c];
    }
    __syncthreads();
  }
  if (rl == 0 && active) {
    const size_t g = size_t(blockIdx.y) * N + size_t(w0) * 8;
#pragma unroll
    for (int m = 0; m < MT; ++m) {  // compile-time m keeps acc in registers
      if (m >= M) break;
      float* out = partial + (size_t(blockIdx.y) * M + m) * N + size_t(w0) * 8;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const float s = __half2float(scales[g + c]), z = __half2float(zeros[g + c]);
        out[c] = s * (acc[m][c] + red[m][c][cl] - z * xsum[m]);
      }
    }
  }
  // The last chunk of this column tile to finish adds all chunks, in chunk order.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&tickets[blockIdx.x], 1u) == gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  const int cols = kColLanes * C, col0 = blockIdx.x * cols;
  for (int i = threadIdx.x; i < M * cols; i += kThreads) {
    const int m = i / cols, n = col0 + i % cols;
    if (n >= N) continue;
    float v = 0.0f;
    for (int c = 0; c < int(gridDim.y); ++c) v += __ldcg(partial + (size_t(c) * M + m) * N + n);
    y[size_t(m) * N + n] = v;
  }
  if (threadIdx.x == 0) tickets[blockIdx.x] = 0;  // ready for the next launch
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
                int group, float* partial, unsigned* tickets, float* y, cudaStream_t s) {
  if (M < 1 || M > 16 || K % kChunk || N % 8 || group != kChunk)
    fail("w4a16_gemv: unsupported shape M={} K={} N={} group={} (K % 128, N % 8, group 128)", M, K, N, group);
  auto launch = [&](auto kernel, int W) {
    const dim3 grid(unsigned((N / 8 + kColLanes * W - 1) / (kColLanes * W)), unsigned(K / kChunk));
    kernel<<<grid, kThreads, 0, s>>>(x, M, K, N, qw, scales, zeros, partial, tickets, y);
  };
  if (M == 1 && N % 32 == 0) launch(w4a16_gemv_kernel<1, 4>, 4);
  else if (M <= 4 && N % 16 == 0) launch(w4a16_gemv_kernel<4, 2>, 2);
  else launch(w4a16_gemv_kernel<16, 1>, 1);
  TMKIT_CUDA_LAUNCHED();
}

void w4_dequant(const int32_t* qw, const __half* scales, const __half* zeros, int K, int N, int group, __half* w,
                cudaStream_t s) {
  const size_t words = size_t(K) * N / 8;
  w4_dequant_kernel<<<unsigned((words + 255) / 256), 256, 0, s>>>(qw, scales, zeros, K, N, group, w);
  TMKIT_CUDA_LAUNCHED();
}

}  // namespace tmkit::cuda
