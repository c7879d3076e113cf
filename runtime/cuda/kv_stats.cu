// KV statistics for kv-calibrate: per channel min / max / absmax of K before and after RoPE and of
// V over all rows of a forward (pass one), and histograms of K before RoPE and of V (pass two).
// A thread owns one channel of a slab of rows (threads of a warp read consecutive channels of a
// row: coalesced) and folds its slab into the totals with integer atomics (on the floats' bit
// patterns for the extremes): exact, so the order of slabs does not matter.
#include "kernels.h"

namespace tmkit::cuda {

namespace {

constexpr int kRowsPerSlab = 256;

// Float max / min through the integer order of IEEE bit patterns (non-negative floats order as
// signed ints, negative ones in reverse as unsigned ints).
__device__ inline void atomic_max(float* a, float v) {
  if (v >= 0) atomicMax(reinterpret_cast<int*>(a), __float_as_int(v));
  else atomicMin(reinterpret_cast<unsigned*>(a), __float_as_uint(v));
}
__device__ inline void atomic_min(float* a, float v) {
  if (v >= 0) atomicMin(reinterpret_cast<int*>(a), __float_as_int(v));
  else atomicMax(reinterpret_cast<unsigned*>(a), __float_as_uint(v));
}

template <typename T>
__global__ void kv_stats_kernel(const float* qkv, const T* bias, int rows, int H, int KV, int D, bool pre_rope,
                                float* stats) {
  const int n = KV * D, width = (H + 2 * KV) * D;
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;  // over the K (and V) channels folded
  const int parts = pre_rope ? 2 : 1;                      // pre: K before RoPE and V; post: K
  if (ch >= parts * n) return;
  const int col = H * D + ch;  // K channels, then V's
  const int r0 = blockIdx.y * kRowsPerSlab, r1 = min(rows, r0 + kRowsPerSlab);
  const float b = pre_rope && bias ? to_float(bias[col]) : 0.0f;
  float lo = INFINITY, hi = -INFINITY, ab = 0.0f;
  for (int r = r0; r < r1; ++r) {
    const float x = pre_rope ? qkv[size_t(r) * width + col] + b : qkv[size_t(r) * width + col];
    lo = fminf(lo, x);
    hi = fmaxf(hi, x);
    ab = fmaxf(ab, fabsf(x));
  }
  // stats planes: K (0..2), K before RoPE (3..5), V (6..8); min, max, absmax.
  const int tensor = pre_rope ? (ch < n ? 1 : 2) : 0, c = ch % n;
  atomic_min(stats + size_t(3 * tensor) * n + c, lo);
  atomic_max(stats + size_t(3 * tensor + 1) * n + c, hi);
  atomic_max(stats + size_t(3 * tensor + 2) * n + c, ab);
}

__global__ void kv_stats_init_kernel(float* stats, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < 9 * n) stats[i] = (i / n) % 3 == 0 ? INFINITY : -INFINITY;
}

// Pass two: a thread owns one channel (K before RoPE, then V) of a slab of rows and counts each
// value into the channel's bins (kv_hist_bin's arithmetic); counts are integers, so exact.
template <typename T>
__global__ void kv_histogram_kernel(const float* qkv, const T* bias, int rows, int H, int KV, int D, const float* ranges,
                                    unsigned* counts) {
  const int n = KV * D, width = (H + 2 * KV) * D;
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= 2 * n) return;
  const int col = H * D + ch;
  const int r0 = blockIdx.y * kRowsPerSlab, r1 = min(rows, r0 + kRowsPerSlab);
  const float b = bias ? to_float(bias[col]) : 0.0f;
  const float lo = ranges[ch], hi = ranges[2 * n + ch];
  const float inv = hi > lo ? float(kHistBins) / (hi - lo) : 0.0f;
  unsigned* mine = counts + size_t(ch) * kHistBins;
  for (int r = r0; r < r1; ++r) {
    const float x = qkv[size_t(r) * width + col] + b;
    const float f = __fmul_rn(__fsub_rn(x, lo), inv);  // no contraction: the CPU's rounding
    const int bin = f <= 0.0f ? 0 : f >= float(kHistBins - 1) ? kHistBins - 1 : int(f);
    atomicAdd(mine + bin, 1u);
  }
}

}  // namespace

template <typename T>
void kv_histogram(const float* qkv, const T* bias, int rows, int H, int KV, int D, const float* ranges, unsigned* counts,
                  cudaStream_t s) {
  const dim3 grid(unsigned((2 * KV * D + 127) / 128), unsigned((rows + kRowsPerSlab - 1) / kRowsPerSlab));
  kv_histogram_kernel<<<grid, 128, 0, s>>>(qkv, bias, rows, H, KV, D, ranges, counts);
  TMKIT_CUDA_LAUNCHED();
}

template <typename T>
void kv_stats(const float* qkv, const T* bias, int rows, int H, int KV, int D, bool pre_rope, float* stats, cudaStream_t s) {
  const int channels = (pre_rope ? 2 : 1) * KV * D;
  const dim3 grid(unsigned((channels + 127) / 128), unsigned((rows + kRowsPerSlab - 1) / kRowsPerSlab));
  kv_stats_kernel<<<grid, 128, 0, s>>>(qkv, bias, rows, H, KV, D, pre_rope, stats);
  TMKIT_CUDA_LAUNCHED();
}

void kv_stats_init(float* stats, int KV, int D, cudaStream_t s) {
  const int n = KV * D;
  kv_stats_init_kernel<<<unsigned((9 * n + 255) / 256), 256, 0, s>>>(stats, n);
  TMKIT_CUDA_LAUNCHED();
}

template void kv_histogram<__half>(const float*, const __half*, int, int, int, int, const float*, unsigned*, cudaStream_t);
template void kv_histogram<__nv_bfloat16>(const float*, const __nv_bfloat16*, int, int, int, int, const float*, unsigned*,
                                          cudaStream_t);
template void kv_stats<__half>(const float*, const __half*, int, int, int, int, bool, float*, cudaStream_t);
template void kv_stats<__nv_bfloat16>(const float*, const __nv_bfloat16*, int, int, int, int, bool, float*, cudaStream_t);

}  // namespace tmkit::cuda
