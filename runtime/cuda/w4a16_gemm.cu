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
// chunk writes partial[chunk][m][n], and a second kernel adds the chunks in order with one
// thread per output and every chunk's load in flight at once (deterministic, no atomics).
// (A single-launch variant, where the last block of a column tile added the chunks, measured
// 44 us for 4096 x 22016 at M = 1: that block's serial chain of L2 loads was the tail.)
// M > 16 (prefill): dequantize W to fp16 once, then the caller's dense GEMM.
#include "kernels.h"

namespace tmkit::cuda {

namespace {

// Block shapes (column lanes x row lanes over a chunk of K rows), selectable for measurement:
//   variant 0: 64 x 4 over 128 rows (few large blocks: 64 for 4096 x 4096 at M = 1)
//   variant 1: 32 x 8 over 64 rows (4x the blocks, a quarter of the work each)
constexpr int kThreads = 256, kInFlight = 8;

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

template <int MT, int W, int kColLanes, int kChunk>
__global__ void __launch_bounds__(kThreads) w4a16_gemv_kernel(const __half* __restrict__ x, int M, int K, int N,
                                                             const int32_t* __restrict__ qw, const __half* __restrict__ scales,
                                                             const __half* __restrict__ zeros, int group,
                                                             float* partial) {
  constexpr int kRowLanes = kThreads / kColLanes;
  constexpr int C = 8 * W;  // output columns per thread
  __shared__ float xs[MT][kChunk];
  __shared__ float xsum[MT];
  __shared__ float red[MT][C][kColLanes];  // row lanes 1..3 add into it in turn (static smem stays < 48 KB)
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
    const size_t g = size_t(k0 / group) * N + size_t(w0) * 8;
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
}

// y[m, n] = sum over chunks of partial[chunk][m][n], in chunk order; loads issued 8 at a time.
__global__ void sum_chunks_kernel(const float* __restrict__ partial, int chunks, int MN, float* __restrict__ y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= MN) return;
  float v = 0.0f;
  int c = 0;
  for (; c + 8 <= chunks; c += 8) {
    float t[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) t[u] = partial[size_t(c + u) * MN + i];
#pragma unroll
    for (int u = 0; u < 8; ++u) v += t[u];
  }
  for (; c < chunks; ++c) v += partial[size_t(c) * MN + i];
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

template <int kColLanes, int kChunk>
void gemv_variant(const __half* x, int M, int K, int N, const int32_t* qw, const __half* scales, const __half* zeros,
                  int group, float* partial, float* y, cudaStream_t s) {
  if (M < 1 || M > 16 || K % group || N % 8 || group % kChunk)
    fail("w4a16_gemv: unsupported shape M={} K={} N={} group={} (K % group, N % 8, group % {})", M, K, N, group, kChunk);
  auto launch = [&](auto kernel, int W) {
    const dim3 grid(unsigned((N / 8 + kColLanes * W - 1) / (kColLanes * W)), unsigned(K / kChunk));
    kernel<<<grid, kThreads, 0, s>>>(x, M, K, N, qw, scales, zeros, group, partial);
  };
  if (M == 1 && N % 32 == 0) launch(w4a16_gemv_kernel<1, 4, kColLanes, kChunk>, 4);
  else if (M <= 4 && N % 16 == 0) launch(w4a16_gemv_kernel<4, 2, kColLanes, kChunk>, 2);
  else launch(w4a16_gemv_kernel<16, 1, kColLanes, kChunk>, 1);
  TMKIT_CUDA_LAUNCHED();
  sum_chunks_kernel<<<(M * N + 255) / 256, 256, 0, s>>>(partial, K / kChunk, M * N, y);
  TMKIT_CUDA_LAUNCHED();
}

size_t w4a16_partial_floats(int M, int K, int N) { return size_t(K / 64) * M * N; }  // the smallest chunk

void w4a16_gemv(const __half* x, int M, int K, int N, const int32_t* qw, const __half* scales, const __half* zeros,
                int group, float* partial, float* y, cudaStream_t s, int variant) {
  if (variant == 1) gemv_variant<32, 64>(x, M, K, N, qw, scales, zeros, group, partial, y, s);
  else gemv_variant<64, 128>(x, M, K, N, qw, scales, zeros, group, partial, y, s);
}

void w4_dequant(const int32_t* qw, const __half* scales, const __half* zeros, int K, int N, int group, __half* w,
                cudaStream_t s) {
  const size_t words = size_t(K) * N / 8;
  w4_dequant_kernel<<<unsigned((words + 255) / 256), 256, 0, s>>>(qw, scales, zeros, K, N, group, w);
  TMKIT_CUDA_LAUNCHED();
}

}  // namespace tmkit::cuda
