// The second step of attention_decode.cu: merges the per-chunk partials of each query row,
//   out = sum_c acc_c 2^(m_c - M) / sum_c l_c 2^(m_c - M),   M = max_c m_c,
// in chunk order (deterministic; no atomics). Grid (H, T, B), one thread per output channel: the
// partials of one row are chunks x D floats, contiguous per chunk ([B][T][H][chunks][D]), so a
// block's reads are coalesced and the (m, l) pairs are broadcasts. Only the chunks that hold keys
// at this position (read from pos_dev under CUDA graphs) are read; chunk 0 always holds key 0,
// which every query sees, so M is finite.
#include "kernels.h"

namespace tmkit::cuda {

namespace {

template <typename T>
__global__ void attention_combine_kernel(const float* part_acc, const float2* part_ml, int T_, int H, int D, int chunk,
                                         int chunks, int pos0, const int* pos_dev, T* out) {
  if (pos_dev) pos0 = *pos_dev;
  const int h = blockIdx.x, t = blockIdx.y, seq = blockIdx.z, d = threadIdx.x;
  const int used = min(chunks, (pos0 + T_ + chunk - 1) / chunk);
  const size_t row = (size_t(seq) * T_ + t) * H + h, base = row * size_t(chunks);
  float M = -INFINITY;
  for (int c = 0; c < used; ++c) M = fmaxf(M, part_ml[base + c].x);
  float num = 0.0f, den = 0.0f;
  for (int c = 0; c < used; ++c) {
    const float2 ml = part_ml[base + c];
    const float f = ml.x == -INFINITY ? 0.0f : exp2f(ml.x - M);  // a chunk wholly after this query
    num += part_acc[(base + c) * D + d] * f;
    den += ml.y * f;
  }
  out[row * D + d] = from_float<T>(num / den);
}

}  // namespace

template <typename T>
void attention_combine(const float* part_acc, const float2* part_ml, int B, int T_, int H, int D, int chunk, int chunks,
                       int pos0, const int* pos_dev, T* out, cudaStream_t s) {
  attention_combine_kernel<T><<<dim3(H, T_, B), D, 0, s>>>(part_acc, part_ml, T_, H, D, chunk, chunks, pos0, pos_dev, out);
  TMKIT_CUDA_LAUNCHED();
}

template void attention_combine<__half>(const float*, const float2*, int, int, int, int, int, int, int, const int*, __half*,
                                        cudaStream_t);
template void attention_combine<__nv_bfloat16>(const float*, const float2*, int, int, int, int, int, int, int, const int*,
                                               __nv_bfloat16*, cudaStream_t);

}  // namespace tmkit::cuda
