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
#include "kernels.h"

namespace tmkit::cuda {

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

// [8 gate | 8 up] interleaved columns: the gate column of activation column c, and the activation
// column of gate column n (its up column is n + 8).
__host__ __device__ __forceinline__ size_t gate_column(size_t c) { return c / 8 * 16 + c % 8; }
__device__ __forceinline__ size_t act_column(size_t n) { return n / 16 * 8 + n % 8; }
__device__ __forceinline__ bool is_gate_column(int n) { return (n / 8) % 2 == 0; }

template <typename T>
__device__ __forceinline__ void store_gated(const GemvOut<T>& o, int N, int m, int gate_n, float gate, float up) {
  o.act[size_t(m) * (N / 2) + act_column(gate_n)] = from_float<T>(silu(gate) * up);
}

}  // namespace tmkit::cuda
