// Negative log-likelihood of each row's target under log-softmax, computed where the logits
// are: only one float per row ever leaves the device.
#include "block_reduce.cuh"
#include "kernels.h"

namespace tmkit::cuda {

__global__ void nll_kernel(const float* logits, int ld, int V, const int32_t* targets, float* nll) {
  __shared__ float scratch[32];
  pdl_begin();
  const float* row = logits + size_t(blockIdx.x) * ld;
  float m = -INFINITY;
  for (int c = threadIdx.x; c < V; c += blockDim.x) m = fmaxf(m, row[c]);
  m = block_max(m, scratch);
  float z = 0.0f;
  for (int c = threadIdx.x; c < V; c += blockDim.x) z += expf(row[c] - m);
  z = block_sum(z, scratch);
  if (threadIdx.x == 0) nll[blockIdx.x] = m + logf(z) - row[targets[blockIdx.x]];
}

void nll_rows(const float* logits, int ld, int V, const int32_t* targets, int rows, float* nll, cudaStream_t s) {
  launch_kernel(nll_kernel, rows, 256, 0, s, logits, ld, V, targets, nll);
}

}  // namespace tmkit::cuda
