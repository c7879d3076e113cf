// Embedding gather: one block per token, the row converted to the fp32 residual stream.
#include "kernels.h"

namespace tmkit::cuda {

template <typename T>
__global__ void embedding_kernel(const int32_t* ids, const T* table, int hidden, float* x) {
  const T* row = table + size_t(ids[blockIdx.x]) * hidden;
  float* out = x + size_t(blockIdx.x) * hidden;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) out[c] = to_float(row[c]);
}

template <typename T>
void embedding(const int32_t* ids, int T_, const T* table, int hidden, float* x, cudaStream_t s) {
  embedding_kernel<<<T_, 256, 0, s>>>(ids, table, hidden, x);
  TMKIT_CUDA_LAUNCHED();
}

template void embedding<__half>(const int32_t*, int, const __half*, int, float*, cudaStream_t);
template void embedding<__nv_bfloat16>(const int32_t*, int, const __nv_bfloat16*, int, float*, cudaStream_t);

}  // namespace tmkit::cuda
