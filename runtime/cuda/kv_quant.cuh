// The online KV quantizer of ../kv_quant.h on the GPU, for one head held by a warp (each lane its
// first n of 4 values): fp16 scale and zero from the warp's min and max, then codes. Shared by the
// round trip on the qkv buffer (kv_quant.cu) and the cache append (kv_cache.cu), which must agree
// bit for bit; explicit roundings (no FMA contraction) make both equal the CPU's kv_fake_quant.
#pragma once
#include "block_reduce.cuh"
#include "cuda_utils.h"

namespace tmkit::cuda {

struct KvQuantParams {
  __half scale_h, zero_h;  // as the cache stores them
  float scale, zero, qmax;
};

__device__ inline KvQuantParams kv_quant_params(const float (&v)[4], int n, int bits) {
  float lo = INFINITY, hi = -INFINITY;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (i < n) {
      lo = fminf(lo, v[i]);
      hi = fmaxf(hi, v[i]);
    }
  lo = -warp_max(-lo);
  hi = warp_max(hi);
  KvQuantParams p;
  p.qmax = float((1 << bits) - 1);
  p.scale_h = __float2half_rn(__fdiv_rn(__fsub_rn(hi, lo), p.qmax));
  p.zero_h = __float2half_rn(lo);
  p.scale = __half2float(p.scale_h);
  p.zero = __half2float(p.zero_h);
  return p;
}

// The code of v, 0 .. qmax (0 when the head is constant).
__device__ inline float kv_quant_code(float v, const KvQuantParams& p) {
  return p.scale > 0 ? fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(v, p.zero), p.scale)), 0.0f), p.qmax) : 0.0f;
}

}  // namespace tmkit::cuda
