// Embedding gather into the fp32 residual stream, one thread per value (a block per token left
// each thread a chain of dependent loads at decode: 8 us for hidden 4096; ncu).
#include "kernels.h"

namespace tmkit::cuda {

template <typename T>
__global__ void embedding_kernel(const int32_t* __restrict__ ids, int T_, const T* __restrict__ table, int hidden,
                                 float* __restrict__ x) {
  pdl_begin();
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= size_t(T_) * hidden) return;
  const size_t t = i / size_t(hidden), c = i % size_t(hidden);
  x[i] = to_float(table[size_t(ids[t]) * hidden + c]);
}

template <typename T>
void embedding(const int32_t* ids, int T_, const T* table, int hidden, float* x, cudaStream_t s) {
  const size_t n = size_t(T_) * hidden;
  launch_kernel(embedding_kernel<T>, unsigned((n + 255) / 256), 256, 0, s, ids, T_, table, hidden, x);
}

template void embedding<__half>(const int32_t*, int, const __half*, int, float*, cudaStream_t);
template void embedding<__nv_bfloat16>(const int32_t*, int, const __nv_bfloat16*, int, float*, cudaStream_t);

}  // namespace tmkit::cuda
