// The device side of GemvOut (kernels.h): the gated activation written by the decode GEMVs.
//
// Measured (H200, tm-eval bench tg128; TMKIT_GATED_GEMV=0 runs the separate SiLU kernel): SiLU in
// the GEMV, 7B-shape int4 517 -> 525 t/s, small-llama 7,300 -> 7,500. Tried and dropped: the
// residual add into the GEMV's stores (521: a load before each store) and the RMSNorm by the last
// block to finish (480: a fence, an arrival counter and two passes over the row in one block are
// a longer tail than a norm kernel that programmatic launch has already put in place). What
// paid (H100, 532 -> 555 t/s): the norm split across the boundary (GemvOut::residual / fold_in,
// kernels.h), the residual's old values fetched while the weights stream.
#pragma once
#include "block_reduce.cuh"
#include "kernels.h"

namespace tmkit::cuda {

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

// [8 gate | 8 up] interleaved columns: the gate column of activation column c, and the activation
// column of gate column n (its up column is n + 8).
__host__ __device__ __forceinline__ size_t gate_column(size_t c) { return c / 8 * 16 + c % 8; }
__device__ __forceinline__ size_t act_column(size_t n) { return n / 16 * 8 + n % 8; }
__device__ __forceinline__ bool is_gate_column(int n) { return (n / 8) % 2 == 0; }

// The RMSNorm fold (kernels.h): 1 / rms of a row from its `parts` partial sums of squares at
// `row_ss` (global or shared memory), summed by one warp in the same order every run.
__device__ __forceinline__ float fold_inv_rms(const float* row_ss, const FoldIn& f, int K) {
  float sum = 0.0f;
  for (int p = threadIdx.x % 32; p < f.parts; p += 32) sum += row_ss[p];
  return rsqrtf(warp_sum(sum) / float(K) + f.eps);
}

// A GEMV's host-side check of a fold request: M rows, `parts` the partials it would write.
template <typename T>
void check_fold(const char* kernel, const GemvOut<T>& out, int M, int parts) {
  if (!out.residual && !out.fold_in.ss) return;
  if (M > kFoldMaxRows) fail("internal: {} folds a norm for at most {} rows ({} given)", kernel, kFoldMaxRows, M);
  if (out.residual && parts > kFoldMaxParts) fail("internal: {}: {} norm partials > {}", kernel, parts, kFoldMaxParts);
  if (out.fold_in.ss && (out.fold_in.parts < 1 || out.fold_in.parts > kFoldMaxParts))
    fail("internal: {}: reads {} norm partials (1 .. {})", kernel, out.fold_in.parts, kFoldMaxParts);
}

template <typename T>
__device__ __forceinline__ void store_gated(const GemvOut<T>& o, int N, int m, int gate_n, float gate, float up) {
  o.act[size_t(m) * (N / 2) + act_column(gate_n)] = from_float<T>(silu(gate) * up);
}

}  // namespace tmkit::cuda
