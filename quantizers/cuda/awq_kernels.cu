// The AWQ search's kernels. The quantizer is the reference's in fp16 steps, written exactly as
// rtn.h's host version (same operations in the same order, IEEE division, round half to even),
// so a candidate weight here equals the CPU search's bit for bit.
#include "awq_kernels.h"
#include "cuda/block_reduce.cuh"

namespace tmkit::cuda {

namespace {

constexpr int kThreads = 256;
unsigned blocks_for(size_t n) { return unsigned((n + kThreads - 1) / kThreads); }

__device__ inline float fp16r(float x) { return __half2float(__float2half_rn(x)); }

struct Quant {
  float scale, zero;
};
// rtn.h quant_group / quant_code / dequant.
__device__ inline Quant quant_params(float lo, float hi) {
  const float scale = fp16r(fmaxf(fp16r(hi - lo), 1e-5f) / 15.0f);
  return {scale, fminf(fmaxf(-rintf(fp16r(lo / scale)), 0.0f), 15.0f)};
}
__device__ inline float quant_dequant(float w, Quant q) {  // w already fp16-rounded
  const float code = fminf(fmaxf(rintf(fp16r(w / q.scale)) + q.zero, 0.0f), 15.0f);
  return fp16r((code - q.zero) * q.scale);
}

__device__ inline float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One warp per (row, group); lanes stride over the group's columns.
__global__ void fake_quant_kernel(const float* __restrict__ W, int rows, int K, const float* __restrict__ s, int group,
                                  __half* __restrict__ out) {
  const size_t warp = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32, groups = K / group;
  if (warp >= size_t(rows) * groups) return;
  const size_t base = warp / groups * size_t(K) + size_t(warp % groups) * group;
  const int c0 = int(warp % groups) * group;
  float lo = INFINITY, hi = -INFINITY;
  for (int k = lane; k < group; k += 32) {
    const float v = fp16r(s ? W[base + k] * s[c0 + k] : W[base + k]);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  const Quant q = quant_params(warp_min(lo), warp_max(hi));
  for (int k = lane; k < group; k += 32) {
    const float v = quant_dequant(fp16r(s ? W[base + k] * s[c0 + k] : W[base + k]), q);
    out[base + k] = __float2half_rn(s ? v / s[c0 + k] : v);
  }
}

__global__ void to_half_kernel(const float* __restrict__ in, size_t n, __half* __restrict__ out) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __float2half_rn(in[i]);
}

__global__ void add_kernel(float* __restrict__ x, const float* __restrict__ d, size_t n) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] += d[i];
}

constexpr int kMeanSlices = 64;

__global__ void col_abs_sum_kernel(const __half* __restrict__ x, int rows, int cols, float* __restrict__ partial) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const int r0 = int(int64_t(rows) * blockIdx.y / kMeanSlices), r1 = int(int64_t(rows) * (blockIdx.y + 1) / kMeanSlices);
  float sum = 0.0f;
  for (int r = r0; r < r1; ++r) sum += fabsf(__half2float(x[size_t(r) * cols + c]));
  partial[size_t(blockIdx.y) * cols + c] = sum;
}

__global__ void col_mean_kernel(const float* __restrict__ partial, int rows, int cols, float* __restrict__ mean) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  double sum = 0.0;
  for (int s = 0; s < kMeanSlices; ++s) sum += partial[size_t(s) * cols + c];
  mean[c] = float(sum / rows);
}

__device__ inline double warp_sum_d(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void sq_diff_kernel(const float* __restrict__ a, const float* __restrict__ b, size_t n,
                               double* __restrict__ partial) {
  __shared__ double warps[kThreads / 32];
  float sum = 0.0f;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float d = a[i] - b[i];
    sum += d * d;
  }
  const double w = warp_sum_d(double(sum));
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = w;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int i = 0; i < kThreads / 32; ++i) t += warps[i];
    partial[blockIdx.x] = t;
  }
}

__global__ void sq_diff_final_kernel(const double* __restrict__ partial, size_t n, double* __restrict__ loss) {
  double t = 0.0;
  for (int i = 0; i < kSqDiffBlocks; ++i) t += partial[i];
  *loss = t / double(n);
}

__global__ void scale_cols_kernel(float* __restrict__ W, int rows, int cols, const float* __restrict__ s) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < size_t(rows) * cols) W[i] *= s[i % cols];
}

__global__ void unscale_rows_kernel(float* __restrict__ W, int rows, int cols, const float* __restrict__ s) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < size_t(rows) * cols) W[i] /= s[i / cols];
}

__global__ void unscale_cols_kernel(__half* __restrict__ X, int rows, int cols, const float* __restrict__ s) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < size_t(rows) * cols) X[i] = __float2half_rn(__half2float(X[i]) / s[i % cols]);
}

// One warp per (row, group), every candidate in turn.
__global__ void clip_deltas_kernel(const float* __restrict__ W, int rows, int K, int group, int steps, int n_grid,
                                   __half* __restrict__ delta) {
  const size_t warp = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32, groups = K / group;
  if (warp >= size_t(rows) * groups) return;
  const size_t r = warp / groups, col = size_t(warp % groups) * group;
  const float* w = W + r * K + col;
  float amax = 0.0f;
  for (int k = lane; k < group; k += 32) amax = fmaxf(amax, fabsf(w[k]));
  amax = warp_max(amax);
  for (int i = 0; i < steps; ++i) {
    const float mv = amax * (1.0f - float(i) / float(n_grid));
    float lo = INFINITY, hi = -INFINITY;
    for (int k = lane; k < group; k += 32) {
      const float v = fp16r(fminf(fmaxf(w[k], -mv), mv));
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    const Quant q = quant_params(warp_min(lo), warp_max(hi));
    __half* d = delta + (size_t(i) * rows + r) * K + col;
    for (int k = lane; k < group; k += 32) d[k] = __float2half_rn(quant_dequant(fp16r(fminf(fmaxf(w[k], -mv), mv)), q) - w[k]);
  }
}

__global__ void sq_mean_cols_kernel(const float* __restrict__ C, int m, int n_tok, float* __restrict__ err) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= m) return;
  const float* c = C + size_t(blockIdx.y) * m * n_tok;
  float sum = 0.0f;
  for (int t = 0; t < n_tok; ++t) {
    const float v = c[size_t(t) * m + r];
    sum += v * v;
  }
  err[size_t(blockIdx.y) * m + r] = sum / float(n_tok);
}

__global__ void clip_apply_kernel(float* __restrict__ W, int rows, int K, int group, int steps, int n_grid,
                                  const float* __restrict__ err, float* __restrict__ ratio) {
  const int groups = K / group;
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= size_t(rows) * groups) return;
  const size_t r = i / groups, g = i % groups;
  float* w = W + r * K + g * group;
  float amax = 0.0f;
  for (int k = 0; k < group; ++k) amax = fmaxf(amax, fabsf(w[k]));
  float best_err = 1e9f, best_max = amax;
  for (int c = 0; c < steps; ++c) {
    const float e = err[(g * steps + c) * rows + r];
    if (e < best_err) {
      best_err = e;
      best_max = amax * (1.0f - float(c) / float(n_grid));
    }
  }
  for (int k = 0; k < group; ++k) w[k] = fminf(fmaxf(w[k], -best_max), best_max);
  ratio[r * groups + g] = amax > 0.0f ? best_max / amax : 1.0f;
}

// One warp per (output channel n, group g): parameters and codes, transposed to [K, N].
__global__ void final_quant_kernel(const float* __restrict__ W, int N, int K, int group, int pairs_D,
                                   uint8_t* __restrict__ codes, uint8_t* __restrict__ zero_codes,
                                   __half* __restrict__ scales) {
  const size_t warp = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32, groups = K / group;
  if (warp >= size_t(N) * groups) return;
  const int n = int(warp / groups), g = int(warp % groups);
  int row = n;
  if (pairs_D) {  // HF channel j of a head sits at 2j (first half) or 2(j - D/2) + 1 (second half)
    const int j = n % pairs_D, half = pairs_D / 2;
    row = n - j + (j < half ? 2 * j : 2 * (j - half) + 1);
  }
  const float* w = W + size_t(row) * K + size_t(g) * group;
  float lo = INFINITY, hi = -INFINITY;
  for (int k = lane; k < group; k += 32) {
    lo = fminf(lo, fp16r(w[k]));
    hi = fmaxf(hi, fp16r(w[k]));
  }
  const Quant q = quant_params(warp_min(lo), warp_max(hi));
  for (int k = lane; k < group; k += 32) {
    const float code = fminf(fmaxf(rintf(fp16r(fp16r(w[k]) / q.scale)) + q.zero, 0.0f), 15.0f);
    codes[(size_t(g) * group + k) * N + n] = uint8_t(code);
  }
  if (lane == 0) {
    scales[size_t(g) * N + n] = __float2half_rn(q.scale);
    zero_codes[size_t(g) * N + n] = uint8_t(q.zero);
  }
}

// int32 word j of row r = the codes of columns 8j + {0, 2, 4, 6, 1, 3, 5, 7} in nibbles 0..7
// (formats/int4.h kAwqOrder).
__global__ void awq_pack_kernel(const uint8_t* __restrict__ codes, size_t words, int32_t* __restrict__ packed) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= words) return;
  const uint8_t* c = codes + i * 8;  // rows are whole words: word i holds codes 8i .. 8i + 7
  constexpr int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  uint32_t word = 0;
  for (int k = 0; k < 8; ++k) word |= uint32_t(c[order[k]] & 0xf) << (4 * k);
  packed[i] = int32_t(word);
}

__global__ void nonfinite_kernel(const float* __restrict__ x, size_t n, int* flag) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    if (!isfinite(x[i])) *flag = 1;
}

}  // namespace

void awq_to_half(const float* in, size_t n, __half* out, cudaStream_t s) {
  to_half_kernel<<<blocks_for(n), kThreads, 0, s>>>(in, n, out);
  TMKIT_CUDA_LAUNCHED();
}

void awq_add(float* x, const float* d, size_t n, cudaStream_t s) {
  add_kernel<<<blocks_for(n), kThreads, 0, s>>>(x, d, n);
  TMKIT_CUDA_LAUNCHED();
}

size_t awq_col_mean_partials(int cols) { return size_t(kMeanSlices) * cols; }

void awq_col_abs_mean(const __half* x, int rows, int cols, float* partial, float* mean, cudaStream_t s) {
  col_abs_sum_kernel<<<dim3(blocks_for(size_t(cols)), kMeanSlices), kThreads, 0, s>>>(x, rows, cols, partial);
  TMKIT_CUDA_LAUNCHED();
  col_mean_kernel<<<blocks_for(size_t(cols)), kThreads, 0, s>>>(partial, rows, cols, mean);
  TMKIT_CUDA_LAUNCHED();
}

void awq_fake_quant(const float* W, int rows, int K, const float* s, int group, __half* out, cudaStream_t st) {
  fake_quant_kernel<<<blocks_for(size_t(rows) * (K / group) * 32), kThreads, 0, st>>>(W, rows, K, s, group, out);
  TMKIT_CUDA_LAUNCHED();
}

void awq_mean_sq_diff(const float* a, const float* b, size_t n, double* partial, double* loss, cudaStream_t s) {
  sq_diff_kernel<<<kSqDiffBlocks, kThreads, 0, s>>>(a, b, n, partial);
  TMKIT_CUDA_LAUNCHED();
  sq_diff_final_kernel<<<1, 1, 0, s>>>(partial, n, loss);
  TMKIT_CUDA_LAUNCHED();
}

void awq_scale_cols(float* W, int rows, int cols, const float* s, cudaStream_t st) {
  scale_cols_kernel<<<blocks_for(size_t(rows) * cols), kThreads, 0, st>>>(W, rows, cols, s);
  TMKIT_CUDA_LAUNCHED();
}

void awq_unscale_rows(float* W, int rows, int cols, const float* s, cudaStream_t st) {
  unscale_rows_kernel<<<blocks_for(size_t(rows) * cols), kThreads, 0, st>>>(W, rows, cols, s);
  TMKIT_CUDA_LAUNCHED();
}

void awq_unscale_cols(__half* X, int rows, int cols, const float* s, cudaStream_t st) {
  unscale_cols_kernel<<<blocks_for(size_t(rows) * cols), kThreads, 0, st>>>(X, rows, cols, s);
  TMKIT_CUDA_LAUNCHED();
}

void awq_clip_deltas(const float* W, int rows, int K, int group, int steps, int n_grid, __half* delta, cudaStream_t s) {
  clip_deltas_kernel<<<blocks_for(size_t(rows) * (K / group) * 32), kThreads, 0, s>>>(W, rows, K, group, steps, n_grid,
                                                                                   delta);
  TMKIT_CUDA_LAUNCHED();
}

void awq_sq_mean_cols(const float* C, int m, int n_tok, int batches, float* err, cudaStream_t s) {
  sq_mean_cols_kernel<<<dim3(blocks_for(size_t(m)), unsigned(batches)), kThreads, 0, s>>>(C, m, n_tok, err);
  TMKIT_CUDA_LAUNCHED();
}

void awq_clip_apply(float* W, int rows, int K, int group, int steps, int n_grid, const float* err, float* ratio,
                    cudaStream_t s) {
  clip_apply_kernel<<<blocks_for(size_t(rows) * (K / group)), kThreads, 0, s>>>(W, rows, K, group, steps, n_grid, err,
                                                                              ratio);
  TMKIT_CUDA_LAUNCHED();
}

void awq_quantize_pack(const float* W, int N, int K, int group, int pairs_D, uint8_t* codes, uint8_t* zero_codes,
                       int32_t* qweight, int32_t* qzeros, __half* scales, cudaStream_t s) {
  final_quant_kernel<<<blocks_for(size_t(N) * (K / group) * 32), kThreads, 0, s>>>(W, N, K, group, pairs_D, codes,
                                                                                 zero_codes, scales);
  TMKIT_CUDA_LAUNCHED();
  const size_t words = size_t(K) * N / 8, zero_words = size_t(K / group) * N / 8;
  awq_pack_kernel<<<blocks_for(words), kThreads, 0, s>>>(codes, words, qweight);
  TMKIT_CUDA_LAUNCHED();
  awq_pack_kernel<<<blocks_for(zero_words), kThreads, 0, s>>>(zero_codes, zero_words, qzeros);
  TMKIT_CUDA_LAUNCHED();
}

void awq_flag_nonfinite(const float* x, size_t n, int* flag, cudaStream_t s) {
  nonfinite_kernel<<<1024, kThreads, 0, s>>>(x, n, flag);
  TMKIT_CUDA_LAUNCHED();
}

}  // namespace tmkit::cuda
