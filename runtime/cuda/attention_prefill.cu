// Causal GQA attention of B sequences, flash-attention style (online softmax; the [T, T] score
// matrix never exists in memory). Queries are rows pos0 .. pos0 + T - 1 of each sequence; keys and
// values are rows 0 .. pos0 + T - 1, read through a reader (kv_cache.cuh): the fp32 qkv buffer
// itself for a plain forward (pos0 = 0), or the KV cache in fp16/int8/int4 for prefill-with-cache.
// Few queries over a long cache (decode) go to attention_decode.cu instead, which splits the keys.
//
// Grid (ceil(T / BQ), H, B): one block per tile of BQ = 16 query rows of one head of one sequence;
// 4 warps, each owning ROWS = 4 of those rows. Shared memory per block (D = 128: 40.5 KB):
//   q_s [BQ][D]      the tile's queries, pre-multiplied by the softmax scale
//   k_s [BK][D + 1]  BK = 32 keys of the head's kv head, dequantized to fp32; +1 so that lane j
//                    reading key j's channel d hits bank (j + d) % 32: no conflicts. Filled with
//                    consecutive threads on consecutive keys (same 8-channel group), so that their
//                    scalar stores fall in distinct banks too.
//   v_s [BK][D]      the same keys' values; lane l reads channels l, l + 32, ...: no conflicts.
//                    Filled with consecutive threads on consecutive 8-channel groups of one key:
//                    coalesced loads, float4 stores.
// Converting to fp32 once per tile in shared memory keeps the inner loops free of the cache format.
// For each key tile and each of its rows, a warp computes 32 scores (lane j: key k0 + j), folds
// them into the running max m, sum l and the accumulator (lane l owns output channels l + 32 i),
// then rescales once per tile. Keys after the query (causal) or past the end score -inf.
// Output [B T, H D] in T: row b T + t, head h at h D. Queries: row b T + t of q, stride q_stride.
#include <tuple>

#include "block_reduce.cuh"
#include "kernels.h"
#include "kv_cache.cuh"

namespace tmkit::cuda {

namespace {

constexpr int kBQ = 16, kBK = 32, kWarps = 4, kRows = kBQ / kWarps;

template <typename T, int D, typename Kv>
__global__ void __launch_bounds__(kWarps * 32) attention_prefill_kernel(const float* q, size_t q_stride, Kv kv, int T_,
                                                                       int pos0, const int* pos_dev, int H, int KV,
                                                                       float scale, T* out) {
  pdl_begin();
  if (pos_dev) pos0 = *pos_dev;  // decode steps replayed from a CUDA graph read the position here
  constexpr int DL = D / 32;     // output channels per lane
  constexpr int G8 = D / 8;      // 8-channel groups per key (one reader load each)
  __shared__ float q_s[kBQ][D];
  __shared__ float k_s[kBK][D + 1];
  __shared__ __align__(16) float v_s[kBK][D];
  const int h = blockIdx.y, kvh = h / (H / KV), q0 = blockIdx.x * kBQ, seq = blockIdx.z;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  q += size_t(seq) * T_ * q_stride + size_t(h) * D;
  out += size_t(seq) * T_ * H * D + size_t(h) * D;

  for (int idx = threadIdx.x; idx < kBQ * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    q_s[r][d] = q0 + r < T_ ? q[size_t(q0 + r) * q_stride + d] * scale : 0.0f;
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
    for (int idx = threadIdx.x; idx < kBK * G8; idx += blockDim.x) {
      const int j = idx % kBK, g = idx / kBK, key = k0 + j;
      float f[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (key < key_end) Kv::to_float(kv.load(false, seq, kvh, key, g), kv.param(false, seq, kvh, key), f);
#pragma unroll
      for (int i = 0; i < 8; ++i) k_s[j][8 * g + i] = f[i];
    }
    for (int idx = threadIdx.x; idx < kBK * G8; idx += blockDim.x) {
      const int j = idx / G8, g = idx % G8, key = k0 + j;
      float f[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (key < key_end) Kv::to_float(kv.load(true, seq, kvh, key, g), kv.param(true, seq, kvh, key), f);
      float4* dst = reinterpret_cast<float4*>(&v_s[j][8 * g]);
      dst[0] = make_float4(f[0], f[1], f[2], f[3]);
      dst[1] = make_float4(f[4], f[5], f[6], f[7]);
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
    T* o = out + size_t(qi) * H * D;
#pragma unroll
    for (int i = 0; i < DL; ++i) o[lane + 32 * i] = from_float<T>(acc[r][i] / l[r]);
  }
}

template <typename T, typename Kv>
void launch(const float* q, size_t q_stride, const Kv& kv, int B, int T_, int pos0, const int* pos_dev, int H, int KV,
            int D, float scale, T* out, cudaStream_t s) {
  if (B < 1 || T_ < 1) return;
  if (B > 65535) fail("attention: batch {} is more than 65535 sequences", B);
  const dim3 grid((T_ + kBQ - 1) / kBQ, H, B);
  const auto args = std::make_tuple(q, q_stride, kv, T_, pos0, pos_dev, H, KV, scale, out);
  switch (D) {
    case 32: return std::apply([&](auto... a) { launch_kernel(attention_prefill_kernel<T, 32, Kv>, grid, kWarps * 32, 0, s, a...); }, args);
    case 64: return std::apply([&](auto... a) { launch_kernel(attention_prefill_kernel<T, 64, Kv>, grid, kWarps * 32, 0, s, a...); }, args);
    case 128: return std::apply([&](auto... a) { launch_kernel(attention_prefill_kernel<T, 128, Kv>, grid, kWarps * 32, 0, s, a...); }, args);
    default: fail("attention: head_dim {} is not supported on the GPU (32, 64, 128)", D);
  }
}

}  // namespace

template <typename T>
void attention_prefill(const float* q, size_t q_stride, const float* k, const float* v, size_t kv_stride, int B, int T_,
                       int H, int KV, int D, float scale, T* out, cudaStream_t s) {
  const QkvRowsReader kv{k, v, kv_stride, T_, D};
  launch(q, q_stride, kv, B, T_, 0, nullptr, H, KV, D, scale, out, s);
}

template <typename T>
void attention_prefill(const float* q, size_t q_stride, const KvLayer& cache, int B, int T_, int pos0,
                       const int* pos_dev, int H, int KV, int D, float scale, T* out, cudaStream_t s) {
  switch (cache.bits) {
    case 16: launch(q, q_stride, CacheReader<16>{cache}, B, T_, pos0, pos_dev, H, KV, D, scale, out, s); break;
    case 8: launch(q, q_stride, CacheReader<8>{cache}, B, T_, pos0, pos_dev, H, KV, D, scale, out, s); break;
    case 4: launch(q, q_stride, CacheReader<4>{cache}, B, T_, pos0, pos_dev, H, KV, D, scale, out, s); break;
    default: fail("attention: {} bits per KV value is not a cache format (16, 8, 4)", cache.bits);
  }
}

#define TMKIT_INSTANTIATE(T)                                                                                       \
  template void attention_prefill<T>(const float*, size_t, const float*, const float*, size_t, int, int, int, int, int, \
                                     float, T*, cudaStream_t);                                                      \
  template void attention_prefill<T>(const float*, size_t, const KvLayer&, int, int, int, const int*, int, int, int,  \
                                     float, T*, cudaStream_t);
TMKIT_INSTANTIATE(__half)
TMKIT_INSTANTIATE(__nv_bfloat16)
#undef TMKIT_INSTANTIATE

}  // namespace tmkit::cuda
