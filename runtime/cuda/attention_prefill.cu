// Causal GQA attention of one sequence, flash-attention style (online softmax; the [T, T]
// score matrix never exists in memory). Queries are rows pos0 .. pos0 + T - 1 of the sequence;
// keys and values are rows 0 .. pos0 + T - 1, read with their own row stride (the fp32 qkv
// buffer itself for a plain forward, the KV cache for prefill-with-cache and decode, T = 1).
//
// Grid (ceil(T / BQ), H): one block per tile of BQ = 16 query rows of one head; 4 warps, each
// owning ROWS = 4 of those rows. Shared memory per block (D = 128: 40 KB):
//   q_s [BQ][D]      the tile's queries, pre-multiplied by the softmax scale
//   k_s [BK][D + 1]  BK = 32 keys of the head's kv head; +1 so that lane j reading key j's
//                    channel d hits bank (j + d) % 32: no conflicts
//   v_s [BK][D]      the same keys' values; lane l reads channels l, l + 32, ...: no conflicts
// For each key tile and each of its rows, a warp computes 32 scores (lane j: key k0 + j),
// folds them into the running max m, sum l and the accumulator (lane l owns output channels
// l + 32 i), then rescales once per tile. Keys after the query (causal) or past T score -inf.
// Inputs (fp32, after bias and RoPE): q rows of stride q_stride (head h at h D); k and v rows of
// stride kv_stride (kv head j at j D). Output [T, H D] in T.
#include <tuple>

#include "block_reduce.cuh"
#include "kernels.h"

namespace tmkit::cuda {

namespace {

constexpr int kBQ = 16, kBK = 32, kWarps = 4, kRows = kBQ / kWarps;

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) attention_prefill_kernel(const float* q, size_t q_stride, const float* k,
                                                                       const float* v, size_t kv_stride, int T_, int pos0,
                                                                       const int* pos_dev, int H, int KV, float scale, T* out) {
  if (pos_dev) pos0 = *pos_dev;  // decode steps replayed from a CUDA graph read the position here
  constexpr int DL = D / 32;  // output channels per lane
  __shared__ float q_s[kBQ][D];
  __shared__ float k_s[kBK][D + 1];
  __shared__ float v_s[kBK][D];
  const int h = blockIdx.y, kvh = h / (H / KV), q0 = blockIdx.x * kBQ;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const size_t q_off = size_t(h) * D, kv_off = size_t(kvh) * D;

  for (int idx = threadIdx.x; idx < kBQ * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    q_s[r][d] = q0 + r < T_ ? q[size_t(q0 + r) * q_stride + q_off + d] * scale : 0.0f;
  }
  float m[kRows], l[kRows], acc[kRows][DL];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < DL; ++i) acc[r][i] = 0.0f;
  }

  const int key_end = pos0 + min(T_, q0 + kBQ);  // causal: no row of this tile sees keys past its last row
  for (int k0 = 0; k0 < key_end; k0 += kBK) {
    __syncthreads();  // the previous tile is no longer read
    for (int idx = threadIdx.x; idx < kBK * D; idx += blockDim.x) {
      const int j = idx / D, d = idx % D, key = k0 + j;
      const bool valid = key < key_end;
      k_s[j][d] = valid ? k[size_t(key) * kv_stride + kv_off + d] : 0.0f;
      v_s[j][d] = valid ? v[size_t(key) * kv_stride + kv_off + d] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = warp * kRows + r, qi = pos0 + q0 + row;  // absolute position of the query
      if (q0 + row >= T_ || k0 > qi) continue;  // uniform across the warp
      const int key = k0 + lane;
      float s = -INFINITY;
      if (key <= qi) {
        s = 0.0f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) s += q_s[row][d] * k_s[lane][d];
      }
      const float m_new = fmaxf(m[r], warp_max(s));  // finite: key k0 <= qi is always valid
      const float p = key <= qi ? expf(s - m_new) : 0.0f;
      const float corr = expf(m[r] - m_new);
      l[r] = l[r] * corr + warp_sum(p);
#pragma unroll
      for (int i = 0; i < DL; ++i) acc[r][i] *= corr;
      for (int j = 0; j < kBK; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
        for (int i = 0; i < DL; ++i) acc[r][i] += pj * v_s[j][lane + 32 * i];
      }
      m[r] = m_new;
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int qi = q0 + warp * kRows + r;
    if (qi >= T_) continue;
    T* o = out + size_t(qi) * H * D + size_t(h) * D;
#pragma unroll
    for (int i = 0; i < DL; ++i) o[lane + 32 * i] = from_float<T>(acc[r][i] / l[r]);
  }
}

}  // namespace

template <typename T>
void attention_prefill(const float* q, size_t q_stride, const float* k, const float* v, size_t kv_stride, int T_,
                       int pos0, const int* pos_dev, int H, int KV, int D, float scale, T* out, cudaStream_t s) {
  const dim3 grid((T_ + kBQ - 1) / kBQ, H);
  const auto args = std::make_tuple(q, q_stride, k, v, kv_stride, T_, pos0, pos_dev, H, KV, scale, out);
  switch (D) {
    case 32: std::apply([&](auto... a) { attention_prefill_kernel<T, 32><<<grid, kWarps * 32, 0, s>>>(a...); }, args); break;
    case 64: std::apply([&](auto... a) { attention_prefill_kernel<T, 64><<<grid, kWarps * 32, 0, s>>>(a...); }, args); break;
    case 128: std::apply([&](auto... a) { attention_prefill_kernel<T, 128><<<grid, kWarps * 32, 0, s>>>(a...); }, args); break;
    default: fail("attention: head_dim {} is not supported on the GPU (32, 64, 128)", D);
  }
  TMKIT_CUDA_LAUNCHED();
}

template void attention_prefill<__half>(const float*, size_t, const float*, const float*, size_t, int, int, const int*, int,
                                        int, int, float, __half*, cudaStream_t);
template void attention_prefill<__nv_bfloat16>(const float*, size_t, const float*, const float*, size_t, int, int,
                                               const int*, int, int, int, float, __nv_bfloat16*, cudaStream_t);

// Copies the K and V rows of qkv [T, (H + 2 KV) D] to rows pos .. pos + T - 1 of the caches [*, KV D].
__global__ void kv_append_kernel(const float* qkv, int H, int KV, int D, int pos0, const int* pos_dev, float* k_cache,
                                 float* v_cache) {
  const int pos = (pos_dev ? *pos_dev : pos0) + int(blockIdx.x), row = KV * D;
  const float* src = qkv + size_t(blockIdx.x) * (H + 2 * KV) * D + size_t(H) * D;
  for (int c = threadIdx.x; c < row; c += blockDim.x) {
    k_cache[size_t(pos) * row + c] = src[c];
    v_cache[size_t(pos) * row + c] = src[row + c];
  }
}

void kv_append(const float* qkv, int T_, int H, int KV, int D, int pos0, const int* pos_dev, float* k_cache,
               float* v_cache, cudaStream_t s) {
  kv_append_kernel<<<T_, 256, 0, s>>>(qkv, H, KV, D, pos0, pos_dev, k_cache, v_cache);
  TMKIT_CUDA_LAUNCHED();
}

}  // namespace tmkit::cuda
