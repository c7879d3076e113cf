// KV-cache round-trip in place on the fp32 qkv buffer (see ../kv_quant.h for the scheme): what a
// forward without a cache applies to K and V so that it equals attention over the cache. bits 8/4:
// quantize-dequantize; 16: round to fp16. One warp per (token, kv head, K or V); lane l holds
// channels l, l + 32, ... (D <= 128).
#include "kernels.h"
#include "kv_quant.cuh"

namespace tmkit::cuda {

__global__ void kv_quant_kernel(float* qkv, int T_, int H, int KV, int D, int bits) {
  pdl_begin();
  const int warp = int((blockIdx.x * size_t(blockDim.x) + threadIdx.x) / 32), lane = threadIdx.x % 32;
  if (warp >= T_ * KV * 2) return;  // uniform per warp
  const int t = warp / (2 * KV), rest = warp % (2 * KV);  // rest: k heads then v heads
  float* x = qkv + size_t(t) * (H + 2 * KV) * D + size_t(H) * D + size_t(rest) * D;
  if (bits == 16) {  // uniform: the cache stores fp16
    for (int c = lane; c < D; c += 32) x[c] = __half2float(__float2half_rn(x[c]));
    return;
  }
  float v[4];
  for (int i = 0; i < 4; ++i) {
    const int c = lane + 32 * i;
    v[i] = c < D ? x[c] : 0.0f;
  }
  const KvQuantParams p = kv_quant_params(v, lane < D ? (D - 1 - lane) / 32 + 1 : 0, bits);  // channels c < D
  for (int i = 0; i < 4; ++i) {
    const int c = lane + 32 * i;
    if (c >= D) continue;
    const float q = kv_quant_code(v[i], p);
    x[c] = __fadd_rn(__fmul_rn(q, p.scale), p.zero);
  }
}

void kv_fake_quant(float* qkv, int T_, int H, int KV, int D, int bits, cudaStream_t s) {
  if (D > 128) fail("KV quantization: head_dim {} > 128 is not supported on the GPU", D);
  const int64_t threads = int64_t(T_) * KV * 2 * 32;
  launch_kernel(kv_quant_kernel, unsigned((threads + 255) / 256), 256, 0, s, qkv, T_, H, KV, D, bits);
}

}  // namespace tmkit::cuda
