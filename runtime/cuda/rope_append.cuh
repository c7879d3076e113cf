// One warp's share of rope_append (kv_cache.cu), also run by the decode attention kernel that
// rotates and appends the new token's K and V itself (attention_decode.cu): one head of one qkv
// row. Lane l holds the D / 32 consecutive channels l D / 32 .. (l + 1) D / 32 - 1, so that int4's
// channel pairs (2i, 2i + 1) are in one lane for D >= 64, and in lanes (2i, 2i + 1) for D = 32 (one
// shuffle). The min and max over the head's channels are warp reductions (exact in any order);
// scale, zero and codes come from kv_quant.cuh, shared with the round trip on the qkv buffer
// (explicit roundings), which is what makes the cache's dequantized values equal kv_fake_quant's
// bit for bit.
#pragma once
#include "kv_cache.h"
#include "kv_quant.cuh"
#include "rope.cuh"

namespace tmkit::cuda {

// A head's constants for one lane: its channels' bias and rotation frequencies (0: not rotated).
struct HeadRope {
  float bias[4] = {}, freq[4] = {};
};
template <typename T>
__device__ inline HeadRope head_rope(const QkvRope<T>& rope, int head, int D, int lane) {
  HeadRope hr;
  const int per_lane = D / 32, ch = lane * per_lane;
  if (rope.inv_freq)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (rope.bias && i < per_lane) hr.bias[i] = to_float(rope.bias[size_t(head) * D + ch + i]);
      const int j = (ch + i) / 2;  // the pair of channel ch + i
      if (i < per_lane && 2 * j < rope.rot) hr.freq[i] = rope.inv_freq[j];
    }
  return hr;
}

// Head `head` of the qkv row at `qkv_row` (q heads, then K, then V), of sequence `seq` at position
// `pos`: with rope.inv_freq, adds the head's bias and rotates q and k (rope.cuh; pairs (2j, 2j + 1)
// in one lane for D >= 64, in lanes 2j, 2j + 1 for D = 32) and, with `write_back`, writes the head
// back, as bias_rope would; a K or V head then enters the cache. Every lane of the warp calls it.
template <typename T, int BITS>
__device__ inline void rope_append_head(float* qkv_row, int H, int head, int seq, int pos, const KvLayer& c,
                                        const QkvRope<T>& rope, const HeadRope& hr, int lane, bool write_back = true) {
  const int KV = c.kv_heads, D = c.head_dim, per_lane = D / 32;
  const int ch = lane * per_lane;
  float* x = qkv_row + size_t(head) * D + ch;
  // D = 128: a lane's 4 channels as one 16-byte access (prefill rows: 2.3 TB/s with scalar ones).
  __align__(16) float v[4];
  if (per_lane == 4) *reinterpret_cast<float4*>(v) = *reinterpret_cast<const float4*>(x);
  else
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = i < per_lane ? x[i] : 0.0f;

  if (rope.inv_freq) {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] += hr.bias[i];
    if (head < H + KV) {  // q and k are rotated, v is not
      if (per_lane == 1) {  // D = 32: lane 2j holds channel 2j, lane 2j + 1 channel 2j + 1
        const float other = __shfl_xor_sync(0xffffffffu, v[0], 1);
        const int j = ch / 2;
        if (2 * j < rope.rot) {
          float a = lane % 2 ? other : v[0], b = lane % 2 ? v[0] : other;
          rope_rotate(a, b, float(pos), hr.freq[0], rope.scale);
          v[0] = lane % 2 ? b : a;
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; i += 2) {
          const int j = (ch + i) / 2;
          if (i < per_lane && 2 * j < rope.rot) rope_rotate(v[i], v[i + 1], float(pos), hr.freq[i], rope.scale);
        }
      }
    }
    if (write_back && per_lane == 4) *reinterpret_cast<float4*>(x) = *reinterpret_cast<const float4*>(v);
    else if (write_back)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (i < per_lane) x[i] = v[i];
  }
  if (head < H) return;  // q heads: done

  const bool is_v = head >= H + KV;
  const int kvh = (head - H) % KV;
  const size_t dst_row = c.row(seq, kvh, pos);
  uint8_t* dst = (is_v ? c.v : c.k) + dst_row * c.row_bytes();
  if constexpr (BITS == 16) {
    __half* out = reinterpret_cast<__half*>(dst) + ch;
    if (per_lane == 4) {
      const __half2 lo = __floats2half2_rn(v[0], v[1]), hi = __floats2half2_rn(v[2], v[3]);
      *reinterpret_cast<uint2*>(out) = make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
    } else
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (i < per_lane) out[i] = __float2half_rn(v[i]);
  } else {
    const KvQuantParams p = kv_quant_params(v, per_lane, BITS);
    uint32_t q[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) q[i] = uint32_t(kv_quant_code(v[i], p));
    if (lane == 0) (is_v ? c.v_param : c.k_param)[dst_row] = __halves2half2(p.scale_h, p.zero_h);
    if constexpr (BITS == 8) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (i < per_lane) dst[ch + i] = uint8_t(q[i]);
    } else if (per_lane == 1) {  // D = 32: channel pairs span two lanes
      const uint32_t odd = __shfl_down_sync(0xffffffffu, q[0], 1);
      if (lane % 2 == 0) dst[lane / 2] = uint8_t(q[0] | odd << 4);
    } else {
#pragma unroll
      for (int i = 0; i < 4; i += 2)
        if (i < per_lane) dst[(ch + i) / 2] = uint8_t(q[i] | q[i + 1] << 4);
    }
  }
}

}  // namespace tmkit::cuda
