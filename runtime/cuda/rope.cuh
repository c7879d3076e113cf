// The rotary embedding of one channel pair (a, b) at position `pos`: angle pos * inv_freq, both
// terms scaled by the attention scaling of ../rope.h. Shared by bias_rope.cu and the decode
// path's rope_append (kv_cache.cu), so that both rotate with the same instructions.
#pragma once
#include "cuda_utils.h"

namespace tmkit::cuda {

__device__ inline void rope_rotate(float& a, float& b, float pos, float inv_freq, float scale) {
  float sn, cs;
  sincosf(pos * inv_freq, &sn, &cs);
  sn *= scale;
  cs *= scale;
  const float a0 = a;
  a = a0 * cs - b * sn;
  b = a0 * sn + b * cs;
}

}  // namespace tmkit::cuda
