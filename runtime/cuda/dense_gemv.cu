// Dense GEMV for decode steps (M <= kDenseGemvMaxRows): Y[M, N] (fp32) = X[M, K] * W[K, N], W in
// the workspace's element type, row-major as the GEMMs use it (no second copy of the weights).
//
// Why not cuBLAS: at M = 1 the product is a read of W. cuBLAS reads it at ~85% of the copy
// bandwidth, and its kernels cannot start before the kernel ahead of them ends. Here W is
// constant, so a block issues its first loads of W before it waits for the previous kernel
// (programmatic launch, cuda_utils.h): the stream of weights runs on across kernel boundaries.
//
// Work: blocks of 8 warps own a tile of 256 columns and a slice of K. Lane l of a warp reads 16 B
// (columns 8l .. 8l + 7) of one row, so a warp reads 512 contiguous bytes per row and keeps kU rows
// in flight; warp w takes rows w, w + 8, ... of the slice. The slice's x (M x rows, fp32) sits in
// shared memory and is read as broadcasts. At the end the 8 warps' sums meet in shared memory
// (added in warp order), the block writes its slice's partial [slice][M][256] to scratch, and the
// last block of the tile to arrive (a counter per tile, set back to 0 by that block) adds the
// slices in order into Y (or, for the gate/up linear, writes SiLU(gate) * up: GemvOut, whose
// [8 gate | 8 up] columns put both halves of an output in one tile). No float atomics: the result
// does not depend on scheduling.
// Slices are sized so that the grid is one wave of ~4 blocks per SM: short K slices keep every SM
// streaming on narrow layers (4096 columns are only 16 tiles).
// The RMSNorm fold (GemvOut::residual / fold_in, kernels.h): the tile's final block adds into the
// residual rows and writes x * norm_w and the tile's share of each row's squares (one partial per
// tile); a reading GEMV's blocks sum those partials into 1 / rms while they load their x slice.
#include "block_reduce.cuh"
#include "gemv_out.cuh"
#include "kernels.h"

namespace tmkit::cuda {

namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32, kTileCols = 256, kU = 8;
constexpr int kRowStep = kWarps * kU;                // slices are multiples of this many rows
constexpr int kMaxSliceRows = 4096;                   // bounds the x slice in shared memory
constexpr int kMaxSmem = 4 * kMaxSliceRows * 4;       // MR <= 4 rows of it, fp32
// Scratch: a counter per tile, then the partials. The counters sit in a fixed place whatever the
// shape, so that calls of other shapes sharing the scratch never write partials over them.
constexpr int kMaxTiles = 1024;

struct DenseSplit {
  int tiles = 0, slices = 0, rows = 0;  // rows per slice
};

DenseSplit dense_split(int K, int N) {
  DenseSplit sp;
  sp.tiles = (N + kTileCols - 1) / kTileCols;
  // At most one wave of ~4 blocks per SM: a second, partial wave would leave most SMs idle.
  const int want = std::max(1, 4 * sm_count() / sp.tiles);
  const int rows = std::min((K + want - 1) / want, kMaxSliceRows);
  sp.rows = (rows + kRowStep - 1) / kRowStep * kRowStep;
  sp.slices = (K + sp.rows - 1) / sp.rows;
  return sp;
}

template <typename T, int MR>
__global__ void __launch_bounds__(kThreads) dense_gemv_kernel(const T* __restrict__ x, int M, int K, int N,
                                                              const T* __restrict__ w, int slice_rows,
                                                              float* __restrict__ part, int* __restrict__ arrivals,
                                                              const GemvOut<T> out) {
  extern __shared__ float xs[];  // [MR][slice_rows]; reused for the warps' sums [kWarps][MR][kTileCols]
  __shared__ float inv_rms[MR], scratch[32];  // the fold's
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, tile = blockIdx.x, slice = blockIdx.y;
  const int col = tile * kTileCols + 8 * lane, k0 = slice * slice_rows, k1 = min(K, k0 + slice_rows);
  const bool has_col = col < N;  // N % 8 == 0: a lane's 8 columns are all in or all out
  const T* wp = w + size_t(col);

  uint4 wr[kU];
  auto load = [&](int base) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int k = base + u * kWarps;
      wr[u] = has_col && k < k1 ? __ldcs(reinterpret_cast<const uint4*>(wp + size_t(k) * N)) : uint4{};
    }
  };
  load(k0 + warp);  // the weights do not depend on the kernel before
  pdl_begin();
  for (int i = threadIdx.x; i < MR * slice_rows; i += kThreads) {
    const int m = i / slice_rows, k = k0 + i % slice_rows;
    xs[i] = m < M && k < k1 ? to_float(x[size_t(m) * K + k]) : 0.0f;
  }
  if (out.fold_in.ss && warp < M) {  // warp m: row m's 1 / rms
    const float inv = fold_inv_rms(out.fold_in.ss + size_t(warp) * kFoldMaxParts, out.fold_in, K);
    if (lane == 0) inv_rms[warp] = inv;
  }
  __syncthreads();

  float acc[MR][8] = {};
  for (int base = k0 + warp;;) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      float f[8];
      to_float8<T>(wr[u], f);
      const int r = base - k0 + u * kWarps;  // rows past k1 hold zeros, and xs zeros there too
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        const float xv = r < slice_rows ? xs[m * slice_rows + r] : 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[m][i] += xv * f[i];
      }
    }
    base += kRowStep;
    if (base >= k1) break;
    load(base);
  }

  __syncthreads();  // xs is done: its memory takes the warps' sums
  float* sums = xs;
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int i = 0; i < 8; ++i) sums[(warp * MR + m) * kTileCols + 8 * lane + i] = acc[m][i];
  __syncthreads();
  const int c = threadIdx.x, out_col = tile * kTileCols + c;  // kThreads == kTileCols
  const int slices = gridDim.y;
  float s[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    s[m] = 0.0f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) s[m] += sums[(v * MR + m) * kTileCols + c];
    if (slices > 1 && m < M && out_col < N) part[(size_t(slice) * M + m) * N + out_col] = s[m];
  }
  // One block per tile holds the tile's whole sums: the only slice, or the last slice to arrive.
  const bool whole = slices == 1 || last_block_to_arrive(&arrivals[tile], slices);
  if (whole && slices > 1)
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      s[m] = 0.0f;
      if (m < M && out_col < N)
        for (int v = 0; v < slices; ++v) s[m] += __ldcg(&part[(size_t(v) * M + m) * N + out_col]);
    }
  if (whole && out.fold_in.ss)
#pragma unroll
    for (int m = 0; m < MR; ++m) s[m] *= m < M ? inv_rms[m] : 0.0f;
  if (whole && out.act) {  // a gate column's thread needs its up column's sum (c + 8, same tile)
    __syncthreads();  // the warps' sums are read
#pragma unroll
    for (int m = 0; m < MR; ++m) sums[m * kTileCols + c] = s[m];
    __syncthreads();
  }
  if (whole && out.residual) {  // block-uniform: every thread takes part in the sums of squares
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      if (m >= M) break;
      float v = 0.0f;
      if (out_col < N) {
        const size_t i = size_t(m) * N + out_col;
        v = out.residual[i] + s[m] + (out.bias ? to_float(out.bias[out_col]) : 0.0f);
        out.residual[i] = v;
        out.xw[i] = from_float<T>(v * to_float(out.norm_w[out_col]));
      }
      const float squares = block_sum(v * v, scratch);
      if (threadIdx.x == 0) out.ss[m * kFoldMaxParts + tile] = squares;
    }
    return;
  }
  if (!whole || out_col >= N) return;
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    if (m >= M) break;
    if (!out.act) out.y[size_t(m) * N + out_col] = s[m];
    else if (is_gate_column(c)) store_gated(out, N, m, out_col, s[m], sums[m * kTileCols + c + 8]);
  }
}

template <typename T, int MR>
void launch_rows(const T* x, int M, int K, int N, const T* w, const GemvOut<T>& out, float* scratch,
                 cudaStream_t s) {
  constexpr auto kernel = dense_gemv_kernel<T, MR>;
  allow_dynamic_smem<kernel>(kMaxSmem);
  const DenseSplit sp = dense_split(K, N);
  const size_t smem = size_t(std::max(MR * sp.rows, kWarps * MR * kTileCols)) * sizeof(float);
  launch_kernel(kernel, dim3(unsigned(sp.tiles), unsigned(sp.slices)), kThreads, smem, s, x, M, K, N, w, sp.rows,
                scratch + kMaxTiles, reinterpret_cast<int*>(scratch), out);
}

}  // namespace

size_t dense_gemv_scratch_floats(int M, int K, int N) {
  const DenseSplit sp = dense_split(K, N);
  return size_t(kMaxTiles) + size_t(sp.slices) * size_t(M) * size_t(N);
}

template <typename T>
int dense_gemv(const T* x, int M, int K, int N, const T* w, const NoDeduce<GemvOut<T>>& out, float* scratch,
               cudaStream_t s) {
  if (M < 1 || M > kDenseGemvMaxRows || K < 1 || N % 8 || N > kMaxTiles * kTileCols || (out.act && N % 16))
    fail("dense_gemv: unsupported shape M={} K={} N={} (M <= {}, N % 8, N <= {}, gated: N % 16)", M, K, N,
         kDenseGemvMaxRows, kMaxTiles * kTileCols);
  const int tiles = dense_split(K, N).tiles;
  check_fold("dense_gemv", out, M, tiles);
  if (M == 1) launch_rows<T, 1>(x, M, K, N, w, out, scratch, s);
  else if (M == 2) launch_rows<T, 2>(x, M, K, N, w, out, scratch, s);
  else launch_rows<T, 4>(x, M, K, N, w, out, scratch, s);
  return tiles;
}

template int dense_gemv<__half>(const __half*, int, int, int, const __half*, const GemvOut<__half>&, float*,
                                cudaStream_t);
template int dense_gemv<__nv_bfloat16>(const __nv_bfloat16*, int, int, int, const __nv_bfloat16*,
                                       const GemvOut<__nv_bfloat16>&, float*, cudaStream_t);

}  // namespace tmkit::cuda
