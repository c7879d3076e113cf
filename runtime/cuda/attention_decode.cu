// Causal GQA attention of a few queries (T <= 4; decode steps are T = 1) over a long KV cache,
// flash-decoding style. A decode step's attention is a stream over the cache, p * KV * D * 2
// values at position p, with almost no arithmetic per value: what matters is reading the cache
// once, with enough blocks in flight, at any position.
//
// Split over keys: grid (chunks, KV * row_groups, B). Block (c, y, b) takes keys
// [c chunk, (c + 1) chunk) of kv head y / row_groups of sequence b and ALL query rows of that kv
// head's GQA group (R = G T rows: G = H / KV query heads times T tokens; row r is token r / G of
// head kvh G + r % G), up to ROWS of them (more rows: several row groups, the only case that reads
// K/V twice). So each key and value is loaded from memory once per step, whatever G is. The grid
// is sized by the cache's capacity, not the position, so that one CUDA graph replays at every
// position: blocks whose chunk starts past the position (read from pos_dev) exit at once.
//
// Inside a block: 4 warps; a key is read by L = D / 8 consecutive lanes, each holding 8
// consecutive channels (one 16/8/4-byte vector load for fp16/int8/int4: a key's row is one
// contiguous, coalesced read), so a warp reads KPS = 32 / L keys per step and keeps U steps of K
// and V loads in flight before using them. Each lane keeps that key slot's running max m, sum l and
// accumulator over its 8 channels (online softmax, log2 domain: q is pre-scaled by
// softmax_scale * log2 e, so exponentials are exp2f); the L lanes of a key sum their partial dot
// products with log2(L) butterfly shuffles. Without a per-key broadcast, V needs no exchange at
// all: the lane that holds channels 8i..8i+7 of K also accumulates channels 8i..8i+7 of the output.
// At the end the key slots of a warp merge by shuffles, the 4 warps through shared memory
// (acc_s [4][ROWS][D]), always in the same order.
//
// The block writes its chunk's unnormalized partial (acc[D], and (m, l)) per query row to scratch
// [B][T][H][chunks]. The last block of a (sequence, kv head, row group) to finish (an integer
// counter per group in the scratch, which that block sets back to 0 for the next call) merges the
// chunks of its rows:
//   out = sum_c acc_c 2^(m_c - M) / sum_c l_c 2^(m_c - M),   M = max_c m_c,
// in chunk order, whichever block it is: no float atomics, so the result does not depend on
// scheduling, and is the same at every replay. (A separate merge kernel cost a launch per layer
// and decode step.) Chunk 0 always holds key 0, which every query sees, so M is finite.
//
// With a QkvRope (decode steps, one row group), the kernel also does rope_append's work for its
// kv head: q's bias and rotation in registers (a lane's 8 channels are 4 whole pairs), and, in the
// block whose chunk holds a new token, that token's K and V into the cache (rope_append_head, a
// warp per head as rope_append does) before the keys are read. That block alone reads those keys,
// so a barrier orders the two. Why: rope_append was a kernel of its own between the qkv GEMV and
// this one, a chain of round trips (wait, loads, stores, the next kernel's wait) on every layer
// of a decode step.
#include "block_reduce.cuh"
#include "kernels.h"
#include "kv_cache.cuh"
#include "rope_append.cuh"

namespace tmkit::cuda {

namespace {

constexpr int kWarps = 4, kMinChunk = 64, kMaxChunks = 64;

template <typename T, int D, int BITS, int ROWS>
__global__ void __launch_bounds__(kWarps * 32) attention_decode_kernel(const float* q, size_t q_stride, KvLayer cache,
                                                                      int T_, int pos0, const int* pos_dev, int H, int KV,
                                                                      int row_groups, float scale_log2, int chunk,
                                                                      int chunks, float* part_acc, float2* part_ml,
                                                                      int* arrivals, T* out, QkvRope<T> rope) {
  using Kv = CacheReader<BITS>;
  using Raw = typename Kv::Raw;
  constexpr int L = D / 8, KPS = 32 / L, U = ROWS >= 8 ? 2 : 4, kStep = KPS * U;
  __shared__ float acc_s[kWarps][ROWS][D];
  __shared__ float m_s[kWarps][ROWS], l_s[kWarps][ROWS];

  const int kvh = blockIdx.y / row_groups, r0 = (blockIdx.y % row_groups) * ROWS, seq = blockIdx.z;
  const int G = H / KV, R = G * T_;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, slot = lane / L, grp = lane % L;
  const Kv kv{cache};
  // With rope: constants before the wait for the kernel ahead. This lane's q pairs' frequencies,
  // and the K (even warps) or V (odd warps) head this warp may append: a warp's
  // items t of the new tokens all have that head.
  float freq[4] = {};
  HeadRope hr;
  const int append_head = H + (warp % 2 ? KV : 0) + kvh;
  if (rope.inv_freq) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (2 * (4 * grp + i) < rope.rot) freq[i] = rope.inv_freq[4 * grp + i];
    hr = head_rope(rope, append_head, D, lane);
  }
  pdl_begin();

  // q before the position: both loads in flight together (one round trip, not two).
  float qr[ROWS][8], m[ROWS], l[ROWS], acc[ROWS][8];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const int r = r0 + rr;
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) qr[rr][i] = acc[rr][i] = 0.0f;
    if (r < R) {
      const int t = r / G, h = kvh * G + r % G;
      const float4* src = reinterpret_cast<const float4*>(q + (size_t(seq) * T_ + t) * q_stride + size_t(h) * D + 8 * grp);
      const float4 a = src[0], b = src[1];
      const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) qr[rr][i] = v[i];
    }
  }
  if (pos_dev) pos0 = *pos_dev;
  if (rope.inv_freq)  // as rope_append: q + bias, then the rotation, in fp32
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
      const int r = r0 + rr, t = r / G, h = kvh * G + r % G;
      if (r >= R) continue;
#pragma unroll
      for (int i = 0; i < 8; i += 2) {
        float a = qr[rr][i], b = qr[rr][i + 1];
        if (rope.bias) {
          a += to_float(rope.bias[size_t(h) * D + 8 * grp + i]);
          b += to_float(rope.bias[size_t(h) * D + 8 * grp + i + 1]);
        }
        if (2 * (4 * grp + i / 2) < rope.rot) rope_rotate(a, b, float(pos0 + t), freq[i / 2], rope.scale);
        qr[rr][i] = a, qr[rr][i + 1] = b;
      }
    }
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr)
#pragma unroll
    for (int i = 0; i < 8; ++i) qr[rr][i] *= scale_log2;
  const int key_end = pos0 + T_, c = blockIdx.x, first = c * chunk;
  if (first >= key_end) return;  // uniform across the block, before any barrier
  const int last = min(first + chunk, key_end);
  if (rope.inv_freq) {  // the new tokens of this chunk into the cache: item 2 t (K) or 2 t + 1 (V)
    for (int item = warp; item < 2 * T_; item += kWarps) {
      const int t = item / 2, pos = pos0 + t;
      if (pos < first || pos >= last) continue;
      // Read only: rope_append_head writes qkv back only when asked to.
      float* qkv_row = const_cast<float*>(q) + (size_t(seq) * T_ + t) * q_stride;
      rope_append_head<T, BITS>(qkv_row, H, append_head, seq, pos, cache, rope, hr, lane, /*write_back=*/false);
    }
    __syncthreads();
  }
  int limit[ROWS];  // the last key row r may see (causal); -1 for rows past R
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) limit[rr] = r0 + rr < R ? pos0 + (r0 + rr) / G : -1;

  for (int base = first + warp * kStep; base < last; base += kWarps * kStep) {
    Raw kr[U], vr[U];
    float2 kp[U], vp[U];
    int key[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // all loads first: U keys' K and V in flight together
      key[u] = base + u * KPS + slot;
      if (key[u] < last) {
        kr[u] = kv.load(false, seq, kvh, key[u], grp);
        vr[u] = kv.load(true, seq, kvh, key[u], grp);
        kp[u] = kv.param(false, seq, kvh, key[u]);
        vp[u] = kv.param(true, seq, kvh, key[u]);
      } else {
        kr[u] = vr[u] = Raw{};
        kp[u] = vp[u] = make_float2(0.0f, 0.0f);  // dequantizes to 0: finite, and its p is 0
      }
    }
    float s[U][ROWS];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      Kv::to_float(kr[u], kp[u], kf);
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot += qr[rr][i] * kf[i];
        s[u][rr] = dot;
      }
    }
#pragma unroll
    for (int o = 1; o < L; o <<= 1)  // every lane takes part: the L lanes of a key sum their parts
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) s[u][rr] += __shfl_xor_sync(0xffffffffu, s[u][rr], o);
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
      float smax = -INFINITY;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (key[u] >= last || key[u] > limit[rr]) s[u][rr] = -INFINITY;
        smax = fmaxf(smax, s[u][rr]);
      }
      const float m_new = fmaxf(m[rr], smax);
      const bool any = m_new != -INFINITY;  // this key slot has seen a visible key of row rr
      const float corr = any ? exp2f(m[rr] - m_new) : 1.0f;
      l[rr] *= corr;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[rr][i] *= corr;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u][rr] = any ? exp2f(s[u][rr] - m_new) : 0.0f;  // now the probability weight p
        l[rr] += s[u][rr];
      }
      m[rr] = m_new;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[8];
      Kv::to_float(vr[u], vp[u], vf);
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[rr][i] += s[u][rr] * vf[i];
    }
  }

  // Merge the KPS key slots of the warp (lanes grp, grp + L, ...), then the warps.
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    float M = m[rr];
#pragma unroll
    for (int o = L; o < 32; o <<= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    const float f = M == -INFINITY ? 0.0f : exp2f(m[rr] - M);
    l[rr] *= f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[rr][i] *= f;
#pragma unroll
    for (int o = L; o < 32; o <<= 1) {
      l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], o);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[rr][i] += __shfl_xor_sync(0xffffffffu, acc[rr][i], o);
    }
    m[rr] = M;
    if (slot == 0)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc_s[warp][rr][8 * grp + i] = acc[rr][i];
    if (lane == 0) {
      m_s[warp][rr] = m[rr];
      l_s[warp][rr] = l[rr];
    }
  }
  __syncthreads();
  // One chunk holds every key so far (early positions): this block's result is the output, and
  // it is the same value the merge below would compute (one term, factor 2^0).
  const int used = (key_end + chunk - 1) / chunk;  // the blocks that did not exit at once
  for (int idx = threadIdx.x; idx < ROWS * D; idx += blockDim.x) {
    const int rr = idx / D, d = idx % D, r = r0 + rr;
    if (r >= R) continue;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, m_s[w][rr]);
    float num = 0.0f, den = 0.0f;
    if (M != -INFINITY)
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(m_s[w][rr] - M);
        num += acc_s[w][rr][d] * f;
        den += l_s[w][rr] * f;
      }
    const int t = r / G, h = kvh * G + r % G;
    const size_t row = (size_t(seq) * T_ + t) * H + h, part = row * size_t(chunks) + size_t(c);
    if (used == 1) {
      out[row * D + d] = from_float<T>(num / den);
      continue;
    }
    part_acc[part * D + d] = num;
    if (d == 0) part_ml[part] = make_float2(M, den);
  }

  if (used == 1 || !last_block_to_arrive(arrivals + size_t(seq) * gridDim.y + blockIdx.y, used)) return;
  for (int idx = threadIdx.x; idx < ROWS * D; idx += blockDim.x) {
    const int rr = idx / D, d = idx % D, r = r0 + rr;
    if (r >= R) continue;
    const int t = r / G, h = kvh * G + r % G;
    const size_t row = (size_t(seq) * T_ + t) * H + h, base = row * size_t(chunks);
    float M = -INFINITY;
    for (int k = 0; k < used; ++k) M = fmaxf(M, __ldcg(&part_ml[base + k]).x);
    float num = 0.0f, den = 0.0f;
    for (int k = 0; k < used; ++k) {
      const float2 ml = __ldcg(&part_ml[base + k]);
      const float f = ml.x == -INFINITY ? 0.0f : exp2f(ml.x - M);  // a chunk wholly after this query
      num += __ldcg(&part_acc[(base + k) * D + d]) * f;
      den += ml.y * f;
    }
    out[row * D + d] = from_float<T>(num / den);
  }
}

// The kernel's arguments after its template choice, as launch_rows passes them on.
template <typename T>
struct DecodeArgs {
  const float* q;
  size_t q_stride;
  KvLayer cache;
  int T_, pos0;
  const int* pos_dev;
  int H, KV, row_groups;
  float scale_log2;
  int chunk, chunks;
  float* part_acc;
  float2* part_ml;
  int* arrivals;
  T* out;
  QkvRope<T> rope;
};

template <typename T, int D, int BITS>
void launch_rows(int rows_template, dim3 grid, cudaStream_t s, const DecodeArgs<T>& a) {
  auto go = [&](auto kernel) {
    launch_kernel(kernel, grid, kWarps * 32, 0, s, a.q, a.q_stride, a.cache, a.T_, a.pos0, a.pos_dev, a.H, a.KV,
                  a.row_groups, a.scale_log2, a.chunk, a.chunks, a.part_acc, a.part_ml, a.arrivals, a.out, a.rope);
  };
  switch (rows_template) {
    case 1: return go(attention_decode_kernel<T, D, BITS, 1>);
    case 2: return go(attention_decode_kernel<T, D, BITS, 2>);
    case 4: return go(attention_decode_kernel<T, D, BITS, 4>);
    default: return go(attention_decode_kernel<T, D, BITS, 8>);
  }
}

template <typename T, int D>
void launch_bits(int bits, int rows_template, dim3 grid, cudaStream_t s, const DecodeArgs<T>& a) {
  switch (bits) {
    case 16: return launch_rows<T, D, 16>(rows_template, grid, s, a);
    case 8: return launch_rows<T, D, 8>(rows_template, grid, s, a);
    case 4: return launch_rows<T, D, 4>(rows_template, grid, s, a);
    default: fail("attention: {} bits per KV value is not a cache format (16, 8, 4)", bits);
  }
}

// Scratch layout: arrivals [B H kDecodeMaxTokens] ints (at least one per (sequence, kv head, row
// group); first, so that calls with other T find their counters at 0), then part_acc [parts][D]
// floats and part_ml [parts] float2.
size_t arrivals_of(int B, int H) { return size_t(B) * size_t(H) * kDecodeMaxTokens; }
size_t parts_of(int B, int T_, int H, int capacity) {
  return size_t(B) * size_t(T_) * size_t(H) * size_t(attention_decode_split(capacity).chunks);
}

}  // namespace

DecodeSplit attention_decode_split(int capacity) {
  DecodeSplit sp{kMinChunk, 0};
  while ((capacity + sp.chunk - 1) / sp.chunk > kMaxChunks) sp.chunk *= 2;
  sp.chunks = (capacity + sp.chunk - 1) / sp.chunk;
  return sp;
}

size_t attention_decode_scratch_floats(int B, int T_, int H, int D, int capacity) {
  return arrivals_of(B, H) + parts_of(B, T_, H, capacity) * size_t(D + 2);
}

template <typename T>
void attention_decode(const float* q, size_t q_stride, const KvLayer& cache, int B, int T_, int pos0, const int* pos_dev,
                      int H, int KV, int D, float scale, float* scratch, T* out, cudaStream_t s,
                      const QkvRope<T>& rope) {
  if (D != cache.head_dim) fail("attention: head_dim {} differs from the KV cache's {}", D, cache.head_dim);
  if (B < 1 || B > 65535) fail("attention: batch {} is outside 1 .. 65535 sequences", B);
  if (T_ < 1 || T_ > kDecodeMaxTokens) fail("attention: decode takes 1 .. {} queries per sequence, not {}", kDecodeMaxTokens, T_);
  const DecodeSplit sp = attention_decode_split(cache.capacity);
  const int R = (H / KV) * T_;
  const int rows_template = R <= 1 ? 1 : R <= 2 ? 2 : R <= 4 ? 4 : 8;
  const int row_groups = (R + rows_template - 1) / rows_template;
  if (rope.inv_freq && q_stride != size_t(H + 2 * KV) * D)
    fail("attention: rotating in the decode kernel needs q as the qkv buffer (stride {}, not {})", (H + 2 * KV) * D, q_stride);
  QkvRope<T> in_kernel = rope;
  if (rope.inv_freq && row_groups > 1) {  // blocks of other row groups would read the keys unordered
    rope_append(const_cast<float*>(q), rope, B, T_, H, cache, pos0, pos_dev, s);
    in_kernel = {};
  }
  const dim3 grid(sp.chunks, KV * row_groups, B);
  const size_t parts = parts_of(B, T_, H, cache.capacity);
  float* part_acc = scratch + arrivals_of(B, H);
  const DecodeArgs<T> a{q, q_stride, cache, T_, pos0, pos_dev, H, KV, row_groups, scale * 1.4426950408889634f,
                        sp.chunk, sp.chunks, part_acc,
                        reinterpret_cast<float2*>(part_acc + parts * D),  // 8-byte aligned: the offsets are even
                        reinterpret_cast<int*>(scratch), out, in_kernel};
  switch (D) {
    case 32: return launch_bits<T, 32>(cache.bits, rows_template, grid, s, a);
    case 64: return launch_bits<T, 64>(cache.bits, rows_template, grid, s, a);
    case 128: return launch_bits<T, 128>(cache.bits, rows_template, grid, s, a);
    default: fail("attention: head_dim {} is not supported on the GPU (32, 64, 128)", D);
  }
}

template void attention_decode<__half>(const float*, size_t, const KvLayer&, int, int, int, const int*, int, int, int,
                                       float, float*, __half*, cudaStream_t, const QkvRope<__half>&);
template void attention_decode<__nv_bfloat16>(const float*, size_t, const KvLayer&, int, int, int, const int*, int, int,
                                              int, float, float*, __nv_bfloat16*, cudaStream_t,
                                              const QkvRope<__nv_bfloat16>&);

}  // namespace tmkit::cuda
