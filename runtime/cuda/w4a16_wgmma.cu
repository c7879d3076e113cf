// W4A16 for many rows (batches and prefill) on Hopper's warpgroup MMA (sm_90a):
// Y[M, N] (fp32) = X[M, K] (fp16) * W[K, N], W int4 packed as w4a16_common.cuh explains.
//
// Why: the mma.sync GEMM (w4a16_gemm.cu) reached 0.41-0.49x of cuBLAS fp16 at M = 128, its warps
// spending ~3 instructions per mma on assembling fragments; here the tensor cores run
// m64nBMk16 asynchronously while the CUDA cores dequantize the next weights.
//
// Operands: A = W^T from registers, B = X from shared memory. Warp w of a consumer warpgroup
// owns 16 output columns, the column pair (tiles 2p, 2p + 1) of the packed layout: lane (g, c)'s
// uint4 of each tile, dequantized by dequant_word, is exactly wgmma's A fragment of rows g
// (tile 2p's column g) and g + 8 (tile 2p + 1's), k-tile by k-tile, as in w4a16_stream.cu. The
// scale is folded into the fp16 weights ((q - z) * s rounded once: the reference's own
// dequantized values, as in w4a16_gemm.cu).
// B must then follow the packing's k order: virtual k-tile t of a group holds, at positions 2c,
// 2c + 1 and 2c + 8, 2c + 9, the physical rows 32c + 4t + 0, 1 and 32c + 4t + 2, 3 — a
// permutation at 4-byte granularity that no copy engine does, so X arrives in that order, already
// cut into wgmma's core matrices (8 rows x 8 k, 128 bytes): "staged" (staged_x.cuh),
//   xp[group][row / 8][t][h][row % 8][8 halves]   (h = 0: virtual k 0..7, h = 1: k 8..15),
// written by w4_stage_x below or by the kernel that computed X (add_rmsnorm, silu_mul,
// attention_prefill).
// One group of BM rows is then one contiguous range: the producer's single bulk copy per stage,
// and the descriptor of k-tile t is (stage + 256 t, lbo 128, sbo 2048).
//
// Block: consumer warpgroups 0 and 1 (64 columns each: 128 columns per block) and one producer
// warp whose lane 0 keeps S stages of [16 weight units][their scales and zeros][BM rows of xp] in
// flight with the copy engine (full/empty mbarriers as in w4a16_stream.cu): three requests per
// stage, the 16 units (512 bytes each, groups * 512 bytes apart) and their scales through 3-D
// tensor maps, xp as one bulk copy. Issued as 25 separate bulk copies, the same bytes made the
// kernel 1.4-1.7x slower (H200, docs/performance.md): the copy engine's cost is per request.
// Rows past M8 (M rounded up to 8) are never copied: their columns of B are stale shared memory,
// and only their (unstored) outputs see it.
// Split-K: when the tiles leave SMs idle, the grid's z blocks of one tile form a cluster, each
// taking a slice of the groups; their fp32 partials meet in shared memory and block r of the
// cluster sums every split's values, in split order, for its share of the outputs (deterministic;
// no second kernel, no global scratch).
#include <cuda.h>  // CUtensorMap (the driver's function is reached through the runtime)
#include <cudaTypedefs.h>

#include <atomic>

#include "kernels.h"
#include "w4a16_common.cuh"
#include "wgmma.cuh"

namespace tmkit::cuda {

namespace {

using namespace w4;

constexpr int kConsumerThreads = 256, kThreads = kConsumerThreads + 32;  // + one producer warp
constexpr int kTiles = 16;                                               // 128 columns per block
constexpr int kMaxSplits = 8;                                            // the portable cluster size

template <int BM>
struct WgmmaShape {
  static constexpr int kRegs = BM / 2;  // accumulators per consumer thread
  // A stage: the block's 16 weight units of the group, their 8 pairs' scale/zero entries (64 B
  // each, w4a16_stream's order), then BM rows of xp.
  static constexpr int kWBytes = kTiles * 512, kSzBytes = kTiles / 2 * 64, kXOffset = kWBytes + kSzBytes;
  static constexpr int kStageBytes = kXOffset + BM * 256;
  static constexpr int kStages = 220 * 1024 / kStageBytes > 8 ? 8 : 220 * 1024 / kStageBytes;  // 64: 8, 128: 5
  static constexpr int kSmem = kStages * kStageBytes + 2 * kStages * 8;
  static_assert(kRegs * kConsumerThreads * 4 <= kStages * kStageBytes, "the partials reuse the ring");
};

// One thread per (row, group, j): physical rows 32c + 8j .. + 7 (c = 0..3) of the group are the
// virtual k-tiles 2j and 2j + 1 (see above); rows M .. M8 - 1 are written as zeros.
__global__ void w4_stage_x_kernel(const __half* __restrict__ x, int M, int M8, int K, uint4* __restrict__ xp) {
  pdl_begin();
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x, blocks8 = size_t(M8) / 8;
  if (i >= size_t(M8) * K / 32) return;
  // row % 8 fastest, then j: a warp stores whole 128-byte core-matrix rows.
  const int r8 = int(i % 8), j = int(i / 8 % 4);
  const size_t mb = i / 32 % blocks8, grp = i / 32 / blocks8;
  const int row = int(mb) * 8 + r8;
  uint4 w[4] = {};
  if (row < M)
#pragma unroll
    for (int c = 0; c < 4; ++c)
      w[c] = *reinterpret_cast<const uint4*>(x + size_t(row) * K + grp * kGroup + 32 * c + 8 * j);
  uint4* out = xp + (grp * blocks8 + mb) * 128 + r8;  // 2 KB per (group, 8 rows); + 16 B per row
  out[(2 * j) * 16] = make_uint4(w[0].x, w[1].x, w[2].x, w[3].x);
  out[(2 * j) * 16 + 8] = make_uint4(w[0].y, w[1].y, w[2].y, w[3].y);
  out[(2 * j + 1) * 16] = make_uint4(w[0].z, w[1].z, w[2].z, w[3].z);
  out[(2 * j + 1) * 16 + 8] = make_uint4(w[0].w, w[1].w, w[2].w, w[3].w);
}

// Accumulator register i of a consumer thread: its output row (token) and column. Consumer warp
// w owns the block's tiles 2w and 2w + 1 (warpgroup 0: tiles 0..7, warpgroup 1: 8..15).
struct Out {
  int row, col;
};
__device__ __forceinline__ Out out_of(int ctid, int i, int m0, int tile0) {
  const int warp = ctid / 32, lane = ctid % 32, g = lane / 4, c = lane % 4;
  return {m0 + 8 * (i / 4) + 2 * c + (i & 1), (tile0 + 2 * warp) * 8 + g + (i % 4 >= 2 ? 8 : 0)};
}

// `units`: the packed weights as [N / 8 tiles][groups][512 bytes]; `scale_zero`: their scales as
// [N / 16 pairs][groups][64 bytes]; one box = 16 tiles (8 pairs) of one group.
template <int BM>
__global__ void __launch_bounds__(kThreads, 1)
    w4a16_wgmma_kernel(const uint4* __restrict__ xp, int M, int M8, int K, int N, int tile_begin, const __grid_constant__ CUtensorMap units,
                       const __grid_constant__ CUtensorMap scale_zero, float* __restrict__ y) {
  using Shape = WgmmaShape<BM>;
  constexpr int S = Shape::kStages, kRegs = Shape::kRegs;
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + S * Shape::kStageBytes);
  uint64_t* empty = full + S;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int groups = K / kGroup, splits = gridDim.z, per_split = (groups + splits - 1) / splits;
  const int g0 = min(groups, int(blockIdx.z) * per_split), g1 = min(groups, g0 + per_split);
  const int tile = tile_begin + blockIdx.x, col_blocks = N / (kTiles * 8);  // tiles: m blocks of column blocks
  const int tile0 = tile % col_blocks * kTiles, m0 = tile / col_blocks * BM, rows8 = min(BM, M8 - m0);

  if (threadIdx.x == kConsumerThreads) {  // the producer's descriptors, fetched while the barriers are made
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&units)) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&scale_zero)) : "memory");
  }
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumerThreads / 32);
    }
    mbar_init_fence();
  }
  __syncthreads();
  pdl_begin();

  if (warp == kConsumerThreads / 32) {  // the producer warp: lane 0 issues the copies
    if (lane == 0)
      for (int grp = g0, it = 0; grp < g1; ++grp, ++it) {
        const int s = it % S;
        mbar_wait(&empty[s], ((it / S) & 1) ^ 1);
        uint8_t* stage = smem + s * Shape::kStageBytes;
        mbar_arrive_expect_tx(&full[s], Shape::kXOffset + rows8 * 256);
        tma_load_3d(stage, &units, 0, grp, tile0, &full[s]);
        tma_load_3d(stage + Shape::kWBytes, &scale_zero, 0, grp, tile0 / 2, &full[s]);
        bulk_copy(stage + Shape::kXOffset, xp + (size_t(grp) * (M8 / 8) + m0 / 8) * 128, rows8 * 256, &full[s]);
      }
    __syncwarp();
    if (splits > 1) {  // the consumers' two cluster barriers (below)
      cluster_sync();
      cluster_sync();
    }
    return;
  }

  const int ctid = threadIdx.x, g = lane / 4;
  float acc[kRegs];
#pragma unroll
  for (int i = 0; i < kRegs; ++i) acc[i] = 0.0f;
  for (int grp = g0, it = 0; grp < g1; ++grp, ++it) {
    const int s = it % S;
    mbar_wait(&full[s], (it / S) & 1);
    const uint8_t* stage = smem + s * Shape::kStageBytes;
    const uint4 qa = reinterpret_cast<const uint4*>(stage)[(2 * warp) * 32 + lane];
    const uint4 qb = reinterpret_cast<const uint4*>(stage)[(2 * warp + 1) * 32 + lane];
    const uint2 sz = reinterpret_cast<const uint2*>(stage + Shape::kWBytes)[warp * 8 + g];
    const __half2 sza = as_h2(sz.x), szb = as_h2(sz.y), sa = __low2half2(sza), sb = __low2half2(szb);
    const Zero za(__high2half(sza)), zb(__high2half(szb));
    const uint32_t x_stage = smem_addr(stage + Shape::kXOffset);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t a[4], b[4];
      dequant_word(word(qa, j), za, a);
      dequant_word(word(qb, j), zb, b);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = as_u32(__hmul2(as_h2(a[i]), sa));
        b[i] = as_u32(__hmul2(as_h2(b[i]), sb));
      }
      wgmma_fence();
#pragma unroll
      for (int h = 0; h < 2; ++h)  // k-tile 2j + h: rows g = tile 2w, g + 8 = tile 2w + 1
        wgmma_rs<BM>(acc, a[2 * h], b[2 * h], a[2 * h + 1], b[2 * h + 1], make_desc(x_stage + (2 * j + h) * 256, 128, 2048));
      wgmma_commit();
    }
    wgmma_wait<0>();
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
  }

  // Epilogue: the accumulators into the (now idle) ring as the block's rows of 128 floats, then y
  // row by row in float4s: straight from registers, a warp's store covered 8 columns of 4 rows.
  // The pitch of 132 floats puts one register's 32 stores in 32 banks. With split-K, block r of
  // the cluster sums its share of the rows over every split's shared memory, in split order (all
  // loads issued before the first add).
  constexpr int kPitch = kTiles * 8 + 4;
  static_assert(BM * kPitch * 4 <= S * Shape::kStageBytes, "the output tile fits in the ring");
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory");  // every consumer is past its last read
  float* rows = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < kRegs; ++i) {
    const Out o = out_of(ctid, i, 0, 0);
    rows[o.row * kPitch + o.col] = acc[i];
  }
  if (splits > 1)
    cluster_sync();
  else
    asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory");
  const int rank = splits > 1 ? int(cluster_rank()) : 0, per_rank = (rows8 + splits - 1) / splits;
  const int r0 = rank * per_rank, r1 = min(rows8, r0 + per_rank), m1 = min(M - m0, r1);
  for (int q = r0 * 32 + ctid; q < m1 * 32; q += kConsumerThreads) {  // float4 q % 32 of row q / 32
    const float4* at = reinterpret_cast<const float4*>(rows + q / 32 * kPitch) + q % 32;
    float4 sum = *at;
    if (splits > 1) {
      float4 v[kMaxSplits];
#pragma unroll
      for (int r = 0; r < kMaxSplits; ++r)
        if (r < splits) v[r] = load_from_block(at, uint32_t(r));
      sum = v[0];
#pragma unroll
      for (int r = 1; r < kMaxSplits; ++r)
        if (r < splits) sum.x += v[r].x, sum.y += v[r].y, sum.z += v[r].z, sum.w += v[r].w;
    }
    reinterpret_cast<float4*>(y + size_t(m0 + q / 32) * N + tile0 * 8)[q % 32] = sum;
  }
  if (splits > 1) cluster_sync();  // no block leaves while another still reads its partials
}

// Clusters of `splits` blocks that fit on the device at once (GPC boundaries: on an H200 39 of 3,
// 30 of 4, 15 of 8 with one block per SM), per block shape; asked once (a process's devices are
// alike: tensor parallelism runs on copies of one GPU).
template <int BM>
int active_clusters(int splits) {
  static std::atomic<int> known[kMaxSplits + 1] = {};
  if (const int n = known[splits].load()) return n;
  constexpr auto kernel = w4a16_wgmma_kernel<BM>;
  allow_dynamic_smem<kernel>(WgmmaShape<BM>::kSmem);
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim = {1, 1, unsigned(splits)};
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(1, 1, splits);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = WgmmaShape<BM>::kSmem;
  config.attrs = &attr;
  config.numAttrs = 1;
  int n = 0;
  TMKIT_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, kernel, &config));
  known[splits].store(std::max(n, 1));
  return std::max(n, 1);
}

// Split-K factor: the most splits that still run the grid in one wave, at least 4 groups each.
// Measured (H200, M = 128): a second wave of clusters costs more than the shorter slices save
// (4096 x 4096: 3 splits 15.1 us, 4 splits in two waves 22.5), and once the tiles alone fill the
// SMs splitting only adds waves (4096 x 12288: 1 split 27.7 us, 2 splits 38.2).
template <int BM>
int choose_splits(int clusters, int groups) {
  int best = 1;
  for (int s = 2; s <= kMaxSplits && groups >= 4 * s; ++s)
    if (clusters <= active_clusters<BM>(s)) best = s;
  return best;
}

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const auto fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    TMKIT_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || !f) fail("w4a16_wgmma: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// [slabs][rows][row_bytes] (4-byte elements); one box = `box_slabs` slabs of one row.
CUtensorMap slab_map(const void* base, uint64_t row_bytes, uint64_t rows, uint64_t slabs, uint32_t box_slabs) {
  const cuuint64_t dims[3] = {row_bytes / 4, rows, slabs}, strides[2] = {row_bytes, row_bytes * rows};
  const cuuint32_t box[3] = {uint32_t(row_bytes / 4), 1, box_slabs}, unit[3] = {1, 1, 1};
  CUtensorMap map;
  const CUresult r = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_UINT32, 3, const_cast<void*>(base), dims, strides, box, unit,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) fail("w4a16_wgmma: cuTensorMapEncodeTiled failed ({}) for {} x {} x {} bytes", int(r), slabs, rows, row_bytes);
  return map;
}

template <int BM>
void launch(const uint4* xp, int M, int M8, int K, int N, const uint32_t* packed, const uint32_t* scale_zero, float* y,
            cudaStream_t s) {
  using Shape = WgmmaShape<BM>;
  constexpr auto kernel = w4a16_wgmma_kernel<BM>;
  allow_dynamic_smem<kernel>(Shape::kSmem);
  const int groups = K / kGroup, tiles = N / (kTiles * 8) * ((M8 + BM - 1) / BM);
  const CUtensorMap units = slab_map(packed, 512, groups, N / 8, kTiles);
  const CUtensorMap scales = slab_map(scale_zero, 64, groups, N / 16, kTiles / 2);
  auto run = [&](int begin, int count, int splits) {
    launch_kernel_clusters(kernel, dim3(count, 1, splits), dim3(1, 1, splits), kThreads, Shape::kSmem, s, xp, M, M8, K, N,
                           begin, units, scales, y);
  };
  // Whole waves of tiles unsplit, then the remainder split as far as it stays one wave (4096 x
  // 22016 at M = 128: 132 tiles, then 40 in two splits, instead of a second wave of 40 whole ones).
  const int wave = active_clusters<BM>(1), whole = tiles / wave * wave, splits = choose_splits<BM>(tiles - whole, groups);
  if (whole == 0 || whole == tiles || splits == 1) return run(0, tiles, whole == 0 ? splits : 1);
  run(0, whole, 1);
  run(whole, tiles - whole, splits);
}

}  // namespace

void w4_stage_x(const __half* x, int M, int K, __half* staged, cudaStream_t s) {
  if (M < 1 || K % kGroup) fail("w4_stage_x: unsupported shape M={} K={} (K % 128)", M, K);
  const int M8 = int(staged_rows(M));
  const size_t threads = size_t(M8) * K / 32;
  launch_kernel(w4_stage_x_kernel, dim3(unsigned((threads + 255) / 256)), dim3(256), 0, s, x, M, M8, K,
                reinterpret_cast<uint4*>(staged));
}

void w4a16_wgmma(const __half* staged, int M, int K, int N, const uint32_t* packed, const uint32_t* scale_zero, float* y,
                 cudaStream_t s) {
  if (M < 1 || K % kGroup || N % 128)
    fail("w4a16_wgmma: unsupported shape M={} K={} N={} (K % 128, N % 128)", M, K, N);
  const int M8 = int(staged_rows(M));
  const uint4* xp = reinterpret_cast<const uint4*>(staged);
  // Measured and dropped (H200, docs/performance.md): BM = 256 (ptxas serialized its wgmma for
  // want of registers) and 256 columns per block (two m64 tiles per warpgroup, a producer
  // warpgroup and setmaxnreg: it spilled at ptxas's 168-register cap and ran 15-25% slower).
  if (M8 <= 64) return launch<64>(xp, M, M8, K, N, packed, scale_zero, y, s);
  launch<128>(xp, M, M8, K, N, packed, scale_zero, y, s);
}

}  // namespace tmkit::cuda
