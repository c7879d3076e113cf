// The rotary embedding of one channel pair (a, b) at position `pos`: angle pos * inv_freq, both
// terms scaled by the attention scaling of ../rope.h. Shared by bias_rope.cu and the decode
// path's rope_append (rope_append.cuh) and decode attention, so that all rotate with the same
// instructions.
#pragma once
#include "cuda_utils.h"

namespace tmkit::cuda {

// Every operation rounded on its own (no FMA contraction): the compiler may contract differently
// in different kernels, and the decode attention kernel's rotation of q must equal rope_append's.
__device__ inline void rope_rotate(float& a, float& b, float pos, float inv_freq, float scale) {
  float sn, cs;
  sincosf(__fmul_rn(pos, inv_freq), &sn, &cs);
  sn = __fmul_rn(sn, scale);
  cs = __fmul_rn(cs, scale);
  const float a0 = a;
  a = __fsub_rn(__fmul_rn(a0, cs), __fmul_rn(b, sn));
  b = __fadd_rn(__fmul_rn(a0, sn), __fmul_rn(b, cs));
}

}  // namespace tmkit::cuda
