// Device-side readers of K and V for the attention kernels: the fp32 rows of a forward's qkv
// buffer, or the KV cache in fp16, int8 or int4 (layout in kv_cache.h). Every reader hands out
// 8 consecutive channels of one key at a time in two steps, so that kernels can issue the loads of
// several keys before converting any (memory-level parallelism):
//   Raw raw = r.load(is_v, seq, kvh, token, group);     // channels 8 group .. 8 group + 7
//   float2 p = r.param(is_v, seq, kvh, token);          // (scale, zero); unused by fp16/fp32
//   Reader::to_float(raw, p, out);                      // out[8]
// Dequantization is q * scale + zero with explicit roundings (no FMA contraction), so that the
// values equal ../kv_quant.h's kv_fake_quant (and the GPU's cuda/kv_quant.cu) bit for bit.
#pragma once
#include "kv_cache.h"

namespace tmkit::cuda {

// K and V rows of a qkv buffer: sequence `seq` has `seq_rows` rows starting at row seq * seq_rows,
// kv head j at channel j D of the k (or v) pointer, rows `stride` floats apart. Already rounded
// (kv_fake_quant ran on the buffer).
struct QkvRowsReader {
  struct Raw {
    float4 lo, hi;
  };
  const float* k;
  const float* v;
  size_t stride;
  int seq_rows, head_dim;

  __device__ Raw load(bool is_v, int seq, int kvh, int token, int group) const {
    const float* row = (is_v ? v : k) + (size_t(seq) * seq_rows + token) * stride + size_t(kvh) * head_dim;
    return reinterpret_cast<const Raw*>(row)[group];
  }
  __device__ float2 param(bool, int, int, int) const { return make_float2(1.0f, 0.0f); }
  __device__ static void to_float(const Raw& r, float2, float (&out)[8]) {
    out[0] = r.lo.x, out[1] = r.lo.y, out[2] = r.lo.z, out[3] = r.lo.w;
    out[4] = r.hi.x, out[5] = r.hi.y, out[6] = r.hi.z, out[7] = r.hi.w;
  }
};

template <int BITS> struct CacheRaw;
template <> struct CacheRaw<16> { using type = uint4; };     // 8 halves
template <> struct CacheRaw<8> { using type = uint2; };      // 8 codes, one per byte
template <> struct CacheRaw<4> { using type = uint32_t; };  // 8 codes, one per nibble, channel i at bits 4i

// The KV cache with `BITS` per value (16: fp16, 8: int8, 4: int4).
template <int BITS>
struct CacheReader {
  using Raw = typename CacheRaw<BITS>::type;
  KvLayer c;

  __device__ const Raw* row(bool is_v, int seq, int kvh, int token) const {
    return reinterpret_cast<const Raw*>((is_v ? c.v : c.k) + c.row(seq, kvh, token) * c.row_bytes());
  }
  __device__ Raw load(bool is_v, int seq, int kvh, int token, int group) const { return row(is_v, seq, kvh, token)[group]; }
  __device__ float2 param(bool is_v, int seq, int kvh, int token) const {
    if constexpr (BITS == 16) return make_float2(1.0f, 0.0f);
    else return __half22float2((is_v ? c.v_param : c.k_param)[c.row(seq, kvh, token)]);
  }
  __device__ static void to_float(const Raw& r, float2 p, float (&out)[8]) {
    if constexpr (BITS == 16) {
      to_float8<__half>(r, out);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        uint32_t q;
        if constexpr (BITS == 8) q = ((i < 4 ? r.x : r.y) >> (8 * (i % 4))) & 0xffu;
        else q = (r >> (4 * i)) & 0xfu;
        out[i] = __fadd_rn(__fmul_rn(float(q), p.x), p.y);
      }
    }
  }
};

}  // namespace tmkit::cuda
