// W4A16 for decode and small batches (M <= 16, N % 16 == 0): a persistent kernel that streams the
// weights through shared memory with the bulk copy engine.
// Y[M, N] (fp32) = X[M, K] (fp16) * W[K, N], W int4 packed as w4a16_common.cuh explains.
//
// Why: at M = 1 the product is a read of the weights and little else. Loads into registers (the
// split-K GEMV this replaced) pay the memory latency again at the start of every block of a few
// KB; here one producer thread per block keeps S stages of ~8.5 KB in flight per column pair and,
// the grid being persistent, the ring runs on from one unit of work to the next.
//
// Work: units of P column pairs (16P columns: tiles 2p, 2p + 1 of each pair) x all of K, dealt
// round-robin to the blocks (no split-K, no second pass; 4096 columns at P = 1: 256 units on
// 132 SMs). A unit's K runs in chunks of C groups, one per consumer warp (C = 8: 1024 rows);
// chunk = one stage of the ring, per pair [tile 2p: the chunk's groups x 512 B][tile 2p + 1: the
// same][scale/zero: groups x 64 B], each part a contiguous range of the packed arrays: 3P bulk
// copies fill a stage.
// Consumer warp w takes group g0 + w of every chunk with swapped mma operands: A = W^T (16
// columns: the lane's column g of tiles 2p and 2p + 1, whose B-fragment pairs are exactly A's
// a0/a2 and a1/a3), B = x^T (8 rows of x per mma: lane (g, c) holds row g's pairs {2c, 2c+1},
// {2c+8, 2c+9} of a k-tile), so one mma covers 256 weights and each x register feeds P pairs. The
// scale applies per group in fp32 to the mma sums (exact). At the unit's end the C warps' partial
// sums meet in shared memory and are added in warp order (deterministic); a unit's two tiles are
// a gate tile and its up tile when the caller asks for SiLU(gate) * up (GemvOut).
//
// Measured on an H200 (bench-kernels, docs/performance.md): 3 blocks of 3 stages per SM at M <= 8
// (more warps beat deeper rings: the consumers, ~170 instructions per KB, are the limit, not the
// bytes in flight); P = 2 at M = 9..16, where x is twice the work and sharing it across pairs
// pays, in one block of 6 stages per SM, or two of 3 for wide layers; P = 6 where that makes one
// round of units. Dropped: releasing a stage as soon as the warp has its bytes in registers (a
// proxy fence per stage; 0-13% slower), P = 2 at M = 1, split-K over blocks and more mma chains
// (session 13, docs/performance.md).
//
// The RMSNorm fold (GemvOut::residual / fold_in, kernels.h; one row block, one pair a unit, so
// M <= kFoldMaxRows): what it adds travels by cp.async, not registers (the 16-warp shape has none
// to spare): a unit's old residual values, norm weights and bias land in shared memory while its
// chunks stream (double-buffered as the warps' partials are), and a reading GEMV's ss partials
// while its first unit streams; that unit's outputs wait for its warps to sum them into 1 / rms.
// A thread's output is the same row in every unit, so its squares add up in a register, and the
// block's share of each row is summed in a fixed order at the end (the same bits every run).
//
// Scale/zero layout (w4_pack_scale_zero): per (pair, group) 8 uint2, entry g = {half2(scale, zero)
// of column 16p + g, half2(scale, zero) of column 16p + 8 + g}: lane (g, c) reads its two columns'
// constants in one 8-byte load.
#include "gemv_out.cuh"
#include "kernels.h"
#include "w4a16_common.cuh"

namespace tmkit::cuda {

namespace {

using namespace w4;

// C consumer warps a block, each taking one group of every chunk (C groups: one stage).
// A stage, per pair p: [tile 2p: the chunk's groups x 512 B][tile 2p + 1][scale/zero].
// P column pairs per unit (16P columns): the pairs of a group share the warp's x registers.
template <int MB, int S, int P, int C>
struct StreamShape {
  static constexpr int kTileChunkBytes = C * 512, kScaleChunkBytes = C * 64;
  static constexpr int kPairBytes = 2 * kTileChunkBytes + kScaleChunkBytes;
  static constexpr int kStageBytes = P * kPairBytes;
  static constexpr int kRegs = MB * P * 4;                // accumulators per lane
  static constexpr int kRedFloats = 2 * C * kRegs * 32;  // double-buffered
  static constexpr int kSmem = S * kStageBytes + 2 * S * 8 + kRedFloats * 4;
};

// The fold's shared memory after the partials' (in floats): 1 / rms [kFoldMaxRows]; per unit
// parity the old residual values [kFoldMaxRows][16], norm weights and bias [16] (halves); then the
// reading GEMV's ss partials [M][parts rounded up to 4].
constexpr int kFoldInv = 0, kFoldX = kFoldMaxRows, kFoldW = kFoldX + 2 * kFoldMaxRows * 16, kFoldBias = kFoldW + 16,
              kFoldSs = kFoldBias + 16, kFoldBytes = (kFoldSs + kFoldMaxRows * kFoldMaxParts) * 4;
__device__ __forceinline__ int fold_row(int idx) { return 2 * (idx % 4) + ((idx / 32) & 1); }  // MB = 1, P = 1

enum Fold { kNoFold, kFoldIn, kFoldOut };  // GemvOut::fold_in, GemvOut::residual

// MB row blocks of 8 (M <= 8: 1, M <= 16: 2), S stages, kBlocksPerSm blocks per SM, P column
// pairs per unit, C consumer warps, F the fold's half (MB = 1 and P = 1 only).
template <int MB, int S, int kBlocksPerSm, int P, int C, Fold F>
__global__ void __launch_bounds__((C + 1) * 32, kBlocksPerSm)
    w4a16_stream_kernel(const __half* __restrict__ x, int M, int K, int N, const uint4* __restrict__ packed,
                        const uint2* __restrict__ scale_zero, const GemvOut<__half> out) {
  using Shape = StreamShape<MB, S, P, C>;
  constexpr int kConsumers = C, kChunkGroups = C;
  constexpr int kStageBytes = Shape::kStageBytes, kPairBytes = Shape::kPairBytes;
  constexpr int kTileChunkBytes = Shape::kTileChunkBytes;
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + S * kStageBytes);
  uint64_t* empty = full + S;
  float* red = reinterpret_cast<float*>(empty + S);
  float* fold = red + Shape::kRedFloats;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int groups = K / kGroup, chunks = (groups + kChunkGroups - 1) / kChunkGroups, units = N / (16 * P);

  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumers);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (warp == kConsumers) {  // the producer: one thread issues every copy of the block
    if (lane != 0) return;
    int it = 0;
    for (int u = blockIdx.x; u < units; u += gridDim.x)
      for (int ch = 0; ch < chunks; ++ch, ++it) {
        const int s = it % S, g0 = ch * kChunkGroups, ng = min(kChunkGroups, groups - g0);
        mbar_wait(&empty[s], ((it / S) & 1) ^ 1);
        uint8_t* stage = smem + s * kStageBytes;
        mbar_arrive_expect_tx(&full[s], uint32_t(P * ng) * (2 * 512 + 64));
#pragma unroll
        for (int p = 0; p < P; ++p) {
          const int pair = P * u + p;
          for (int t = 0; t < 2; ++t)
            bulk_copy(stage + p * kPairBytes + t * kTileChunkBytes, packed + (size_t(2 * pair + t) * groups + g0) * 32,
                      ng * 512, &full[s]);
          bulk_copy(stage + p * kPairBytes + 2 * kTileChunkBytes, scale_zero + (size_t(pair) * groups + g0) * 8, ng * 64,
                    &full[s]);
        }
      }
    return;
  }

  // The consumers read x and write y, so they wait for the kernel before; the producer reads only
  // the weights, so under programmatic launch (cuda_utils.h) the ring fills during that kernel.
  pdl_begin();
  const int g = lane / 4, c = lane % 4;
  static_assert(F == kNoFold || (MB == 1 && P == 1), "the fold's layout is one row block and one pair a unit");
  constexpr bool fold_in = F == kFoldIn, fold_out = F == kFoldOut;
  const int parts4 = (out.fold_in.parts + 3) / 4 * 4;
  if constexpr (fold_in) {
    for (int i = threadIdx.x; i < M * parts4 / 4; i += kConsumers * 32)
      cp_async16(smem_addr(fold + kFoldSs + 4 * i), out.fold_in.ss + size_t(i / (parts4 / 4)) * kFoldMaxParts + 4 * (i % (parts4 / 4)));
    cp_async_commit();
  }
  float squares = 0.0f;  // fold_out: this thread's output's, over the units
  int it = 0, parity = 0;
  for (int u = blockIdx.x; u < units; u += gridDim.x, parity ^= 1) {
    if constexpr (fold_out) {  // the unit's 16 columns of the residual rows, norm weight and bias
      const int t = threadIdx.x;
      float* fx = fold + kFoldX + parity * kFoldMaxRows * 16;
      __half* fw = reinterpret_cast<__half*>(fold + kFoldW) + parity * 16;
      __half* fb = reinterpret_cast<__half*>(fold + kFoldBias) + parity * 16;
      if (t < 4 * M) cp_async16(smem_addr(fx + 4 * t), out.residual + size_t(t / 4) * N + 16 * u + 4 * (t % 4));
      else if (t < 4 * M + 2) cp_async16(smem_addr(fw + 8 * (t - 4 * M)), out.norm_w + 16 * u + 8 * (t - 4 * M));
      else if (t < 4 * M + 4 && out.bias) cp_async16(smem_addr(fb + 8 * (t - 4 * M - 2)), out.bias + 16 * u + 8 * (t - 4 * M - 2));
      cp_async_commit();
    }
    float acc[MB][P][4] = {};
    for (int ch = 0; ch < chunks; ++ch, ++it) {
      const int s = it % S, grp = ch * kChunkGroups + warp;
      const bool mine = grp < groups;  // uniform across the warp
      // x before the wait: it does not depend on the stage. Rows g (+ 8), physical k = 32c ..
      // 32c + 31; rows past M read row M - 1 (their outputs are never stored).
      uint4 xr[MB][4];
      if (mine)
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          const uint4* src = reinterpret_cast<const uint4*>(x + size_t(min(8 * mb + g, M - 1)) * K + grp * kGroup + 32 * c);
#pragma unroll
          for (int j = 0; j < 4; ++j) xr[mb][j] = __ldg(src + j);
        }
      mbar_wait(&full[s], (it / S) & 1);
      if (mine) {
#pragma unroll
        for (int p = 0; p < P; ++p) {
          const uint8_t* pair = smem + s * kStageBytes + p * kPairBytes;
          const uint4 q0 = reinterpret_cast<const uint4*>(pair)[warp * 32 + lane];
          const uint4 q1 = reinterpret_cast<const uint4*>(pair + kTileChunkBytes)[warp * 32 + lane];
          const uint2 sz = reinterpret_cast<const uint2*>(pair + 2 * kTileChunkBytes)[warp * 8 + g];
          const __half2 sz0 = as_h2(sz.x), sz1 = as_h2(sz.y);
          const Zero z0(__high2half(sz0)), z1(__high2half(sz1));
          float even[MB][4] = {}, odd[MB][4] = {};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            uint32_t b0[4], b1[4];
            dequant_word(word(q0, j), z0, b0);
            dequant_word(word(q1, j), z1, b1);
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
              mma16816(even[mb], b0[0], b1[0], b0[1], b1[1], xr[mb][j].x, xr[mb][j].y);  // k-tile 2j
              mma16816(odd[mb], b0[2], b1[2], b0[3], b1[3], xr[mb][j].z, xr[mb][j].w);   // k-tile 2j + 1
            }
          }
          const float s0 = __low2float(sz0), s1 = __low2float(sz1);
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) {
            acc[mb][p][0] += s0 * (even[mb][0] + odd[mb][0]);
            acc[mb][p][1] += s0 * (even[mb][1] + odd[mb][1]);
            acc[mb][p][2] += s1 * (even[mb][2] + odd[mb][2]);
            acc[mb][p][3] += s1 * (even[mb][3] + odd[mb][3]);
          }
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s]);
    }

    // The warps' partials of the unit's outputs, in a buffer that alternates with the unit: the
    // one barrier per unit keeps a warp from reaching the next-but-one unit's reduction early.
    constexpr int kRegs = Shape::kRegs;
    float* r = red + parity * kConsumers * kRegs * 32;
    const float* a = &acc[0][0][0];
#pragma unroll
    for (int i = 0; i < kRegs; ++i) r[(warp * kRegs + i) * 32 + lane] = a[i];
    if constexpr (F != kNoFold) cp_async_wait<0>();  // landed before the barrier: every thread sees them after it
    asm volatile("bar.sync 1, %0;" ::"n"(C * 32) : "memory");
    if (fold_in && u == blockIdx.x) {  // the first unit: warp m sums row m's partials, in the same order every run
      if (warp < M) {
        const float inv = fold_inv_rms(fold + kFoldSs + warp * parts4, out.fold_in, K);
        if (lane == 0) fold[kFoldInv + warp] = inv;
      }
      asm volatile("bar.sync 1, %0;" ::"n"(C * 32) : "memory");
    }
    // Register i of lane l: row 8 mb + 2 (l % 4) + (i & 1); column l / 4 of tile 2 (P u + p) for
    // i % 4 < 2, of the tile after it else (with GemvOut::act: the gate and its up column).
    auto sum_of = [&](int i, int l) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kConsumers; ++w) sum += r[(w * kRegs + i) * 32 + l];
      return sum;
    };
    for (int idx = threadIdx.x; idx < kRegs * 32; idx += kConsumers * 32) {
      const int i = idx / 32, l = idx % 32, mb = i / (4 * P), p = (i / 4) % P;
      const int row = 8 * mb + 2 * (l % 4) + (i & 1), col = 16 * (P * u + p) + ((i % 4) >= 2 ? 8 : 0) + l / 4;
      if (row >= M) continue;
      if constexpr (fold_out) {
        const int c16 = col - 16 * u;
        const __half b = reinterpret_cast<const __half*>(fold + kFoldBias)[parity * 16 + c16];
        const float v = fold[kFoldX + (parity * kFoldMaxRows + row) * 16 + c16] + sum_of(i, l) + (out.bias ? __half2float(b) : 0.0f);
        out.residual[size_t(row) * N + col] = v;
        out.xw[size_t(row) * N + col] = __float2half(v * __half2float(reinterpret_cast<const __half*>(fold + kFoldW)[parity * 16 + c16]));
        squares += v * v;
        continue;
      }
      const float scale = fold_in ? fold[kFoldInv + row] : 1.0f;
      if (!out.act) out.y[size_t(row) * N + col] = scale * sum_of(i, l);
      else if (i % 4 < 2) store_gated(out, N, row, col, scale * sum_of(i, l), scale * sum_of(i + 2, l));
    }
  }
  if constexpr (fold_out) {  // the block's share of each row's squares; `parity`'s partials buffer is free
    float* r = red + parity * kConsumers * Shape::kRegs * 32;
    if (threadIdx.x < 128) r[threadIdx.x] = squares;
    asm volatile("bar.sync 1, %0;" ::"n"(C * 32) : "memory");
    if (threadIdx.x < M) {
      float sum = 0.0f;
      for (int idx = 0; idx < 128; ++idx)
        if (fold_row(idx) == int(threadIdx.x)) sum += r[idx];
      out.ss[threadIdx.x * kFoldMaxParts + blockIdx.x] = sum;
    }
  }
}

template <int MB, int S, int kBlocksPerSm, int P, int C, Fold F>
int launch_fold(const __half* x, int M, int K, int N, const uint32_t* packed, const uint32_t* scale_zero,
                const GemvOut<__half>& out, cudaStream_t s) {
  constexpr auto kernel = w4a16_stream_kernel<MB, S, kBlocksPerSm, P, C, F>;
  constexpr int smem = StreamShape<MB, S, P, C>::kSmem + (F == kNoFold ? 0 : kFoldBytes);
  allow_dynamic_smem<kernel>(smem);
  const int blocks = std::min(N / (16 * P), kBlocksPerSm * sm_count());
  check_fold("w4a16_stream", out, M, blocks);
  launch_kernel(kernel, unsigned(blocks), (C + 1) * 32, smem, s, x, M, K, N, reinterpret_cast<const uint4*>(packed),
                reinterpret_cast<const uint2*>(scale_zero), out);
  return blocks;
}

template <int MB, int S, int kBlocksPerSm, int P, int C = kWarps>
int launch(const __half* x, int M, int K, int N, const uint32_t* packed, const uint32_t* scale_zero,
           const GemvOut<__half>& out, cudaStream_t s) {
  if constexpr (MB == 1 && P == 1) {
    if (out.residual) return launch_fold<MB, S, kBlocksPerSm, P, C, kFoldOut>(x, M, K, N, packed, scale_zero, out, s);
    if (out.fold_in.ss) return launch_fold<MB, S, kBlocksPerSm, P, C, kFoldIn>(x, M, K, N, packed, scale_zero, out, s);
  } else if (out.residual || out.fold_in.ss) {
    fail("internal: w4a16_stream's {}-row shape cannot fold a norm", M);
  }
  return launch_fold<MB, S, kBlocksPerSm, P, C, kNoFold>(x, M, K, N, packed, scale_zero, out, s);
}

}  // namespace

int w4a16_stream(const __half* x, int M, int K, int N, const uint32_t* packed, const uint32_t* scale_zero,
                 const GemvOut<__half>& out, cudaStream_t s, int variant) {
  if (M < 1 || M > 16 || K % kGroup || N % 16)
    fail("w4a16_stream: unsupported shape M={} K={} N={} (M <= 16, K % 128, N % 16)", M, K, N);
  if ((out.residual || out.fold_in.ss) && M > kFoldMaxRows)  // before a row count picks a shape that cannot fold
    fail("internal: w4a16_stream folds a norm for at most {} rows ({} given)", kFoldMaxRows, M);
  // 16 consumer warps a block where units are few (at most two a SM) and long (K of 64 groups or
  // more: 4+ chunks of 16): more warps then keep more loads in flight per SM. Shorter units are
  // too few chunks for the ring to fill. 11008 x 4096 (H100): M = 1 11.2 -> 10.3 us, M = 16
  // 16.6 -> 15.7; 4096 x 4096 slower with 16 (5.1 -> 5.2, 7.0 -> 7.2). bench-kernels' comparisons:
  // variant 1 takes the other count of warps, variant 2 two blocks of 4 stages per SM with one pair
  // a unit (session 15's other shape, perhaps 4.8 us at 4096 x 4096, M = 1: not yet settled).
  const int pairs = N / 16, sms = sm_count();
  const bool long_units = K >= 64 * kGroup;
  if (variant == 2) return M <= 8 ? launch<1, 4, 2, 1>(x, M, K, N, packed, scale_zero, out, s)
                                  : launch<2, 4, 2, 1>(x, M, K, N, packed, scale_zero, out, s);
  if (M <= 8) {
    if ((long_units && pairs <= 2 * sms) != (variant == 1)) return launch<1, 3, 2, 1, 16>(x, M, K, N, packed, scale_zero, out, s);
    return launch<1, 3, 3, 1>(x, M, K, N, packed, scale_zero, out, s);
  }
  if (N % 32 != 0) return launch<2, 4, 2, 1>(x, M, K, N, packed, scale_zero, out, s);
  // Every unit reads all of x (here up to 16 rows, more bytes than its weights), so fewer, wider
  // units pay as long as they still fill the SMs in one round: 6 pairs a unit (2 stages, the
  // shared memory's limit) where 2 would leave more units than SMs: 4096 x 12288 16.1 -> 13.3 us.
  // Otherwise two blocks of 3 stages per SM once there are units for both (N >= 64 * SMs): 4096 x
  // 22016 29.3 -> 23.9 us, 4096 x 12288 16.6 -> 16.1; with fewer units most SMs would run one
  // small block (4096 x 4096: 6.7 -> 7.3 us). H200, docs/performance.md.
  if (pairs > 2 * sms && pairs <= 6 * sms && pairs % 6 == 0) return launch<2, 2, 1, 6>(x, M, K, N, packed, scale_zero, out, s);
  if (pairs >= 4 * sms) return launch<2, 3, 2, 2>(x, M, K, N, packed, scale_zero, out, s);
  if (long_units != (variant == 1)) return launch<2, 3, 1, 2, 16>(x, M, K, N, packed, scale_zero, out, s);
  return launch<2, 6, 1, 2>(x, M, K, N, packed, scale_zero, out, s);
}

}  // namespace tmkit::cuda
