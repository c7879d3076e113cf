// q/k/v bias and rotary embedding on the fp32 qkv buffer, in place. Layout of one token's row:
//   [ q: H heads x D | k: KV heads x D | v: KV heads x D ]
// TurboMind stores q/k channels as interleaved pairs (2j, 2j+1) (hf2tm permutes HF's halves),
// so pair j of a head is rotated by angle = position * inv_freq[j]. One thread per channel pair
// of the whole buffer (a block per token made decode a 9 us chain of dependent loads; ncu).
// B sequences of T tokens: row b T + t is at position pos0 + t.
#include "kernels.h"
#include "rope.cuh"

namespace tmkit::cuda {

// ../kv_quant.h's kv_static_fake_quant of one value, with its explicit roundings.
__device__ inline float static_fake_quant(float x, float scale, float zero, float qmax) {
  const float q = scale > 0 ? fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x, zero), scale)), 0.0f), qmax) : 0.0f;
  return __fadd_rn(__fmul_rn(q, scale), zero);
}

template <typename T>
__global__ void bias_rope_kernel(float* qkv, const T* bias, const float* inv_freq, float rope_scale, int H, int KV,
                                 int D, int rot, int rows, int T_, int pos0, const int* pos_dev, const float* kv_static,
                                 float qmax) {
  pdl_begin();
  const int pairs = (H + 2 * KV) * D / 2;
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= size_t(rows) * pairs) return;
  const int r = int(i / size_t(pairs)), c = 2 * int(i % size_t(pairs));
  float* row = qkv + size_t(r) * 2 * pairs;
  float a = row[c], b = row[c + 1];
  if (bias) {
    a += to_float(bias[c]);
    b += to_float(bias[c + 1]);
  }
  if (kv_static && c >= H * D) {  // static KV: K before the rotation, and V
    const int n = KV * D, is_v = c >= (H + KV) * D, ch = c - H * D - is_v * n;
    const float* scale = kv_static + 2 * is_v * n + ch;
    a = static_fake_quant(a, scale[0], scale[n], qmax);
    b = static_fake_quant(b, scale[1], scale[n + 1], qmax);
  }
  const int j = (c % D) / 2;
  if (c < (H + KV) * D && 2 * j < rot) {  // q and k heads only; v is not rotated
    const float pos = float((pos_dev ? *pos_dev : pos0) + r % T_);  // row b T + t: position pos0 + t
    rope_rotate(a, b, pos, inv_freq[j], rope_scale);
  }
  row[c] = a;
  row[c + 1] = b;
}

template <typename T>
void bias_rope(float* qkv, const T* bias, const float* inv_freq, float rope_scale, int B, int T_, int H, int KV, int D,
               int rot, int pos0, const int* pos_dev, cudaStream_t s, const float* kv_static, int kv_bits) {
  const size_t n = size_t(B) * T_ * (H + 2 * KV) * D / 2;
  launch_kernel(bias_rope_kernel<T>, unsigned((n + 255) / 256), 256, 0, s, qkv, bias, inv_freq, rope_scale, H, KV, D,
                rot, B * T_, T_, pos0, pos_dev, kv_static, float((1 << kv_bits) - 1));
}

template void bias_rope<__half>(float*, const __half*, const float*, float, int, int, int, int, int, int, int,
                                const int*, cudaStream_t, const float*, int);
template void bias_rope<__nv_bfloat16>(float*, const __nv_bfloat16*, const float*, float, int, int, int, int, int, int,
                                       int, const int*, cudaStream_t, const float*, int);

}  // namespace tmkit::cuda
