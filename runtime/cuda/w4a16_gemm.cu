// W4A16 for many rows (batches and prefill): Y[M, N] (fp32) = X[M, K] (fp16) * W[K, N], W int4
// packed as w4a16_common.cuh explains, through block tiles in shared memory.
//
// Why not the split-K kernels of w4a16_gemv.cu: they read x from L1/L2 once per warp and per
// group, which at M = 128 is 16x the bytes of the weights; and why not dequantize + cuBLAS: that
// writes and reads the weights as fp16 (4.5x the int4 bytes) before the GEMM starts.
//
// A block owns BM = 16 MT WM rows x BT = NT WN column tiles of 8 and walks K one group (128) per
// step through a ring of S stages filled by cp.async (all threads copy, nothing passes through
// registers). Its 8 warps form a WM x WN grid; a warp computes MT m16 tiles x NT n8 tiles.
// Stage layout, in uint4:
//   [0, 16 BM)            x tile: row r's 16 chunks of 8 k, chunk ch stored at ch ^ swz(r, ch)
//   [16 BM, +32 BT)       the BT weight units of this group, 32 uint4 each (lane order)
//   [.., +BT) [.., +BT)   scales, then zeros: one uint4 = one tile's 8 columns
// A fragments: lane (g, c) reads chunks 4c + j (j = 0..3) of rows g and g + 8 (physical k 32c ..
// 32c + 31, as the weight layout wants). A quarter-warp (rows g0, g0 + 1, c = 0..3) would hit
// chunks {j, j + 4, j + 8, j + 12}: two of them share banks (128 B = 8 chunks). The swizzle
// flips bit 1 of the upper half's chunks and bit 0 of odd rows' chunks, giving the 8 lanes the 8
// distinct bank groups j ^ {0, 4, 2, 6, 1, 5, 3, 7}: conflict-free.
// Unlike the GEMV, the weights enter the mma as fp16 (q - z) * s, the reference's own dequantized
// values (one rounding each): with many rows the per-group fp32 rescaling of the accumulators
// cost more registers and instructions than the dequantization itself.
// Rows past M load zeros (cp.async's zero fill) and are not stored; column tiles past N likewise.
#include "kernels.h"
#include "w4a16_common.cuh"

namespace tmkit::cuda {

namespace {

using namespace w4;

__device__ __forceinline__ int swizzle(int row, int ch) { return ch ^ (((ch >> 3) & 1) << 1) ^ (row & 1); }

template <int MT, int WM, int NT, int S>
struct GemmShape {
  static constexpr int kWN = kWarps / WM, kBM = 16 * MT * WM, kBT = NT * kWN;
  static constexpr int kA = kBM * 16, kB = kBT * 32, kStage = kA + kB + 2 * kBT;  // uint4
  static constexpr size_t kSmem = size_t(S) * kStage * sizeof(uint4);
};

template <int MT, int WM, int NT, int S>
__global__ void __launch_bounds__(kWarps * 32, 2)
    w4a16_gemm_kernel(const __half* __restrict__ x, int M, int K, int N, const uint4* __restrict__ packed,
                      const __half* __restrict__ scales, const __half* __restrict__ zeros, float* __restrict__ y) {
  using Shape = GemmShape<MT, WM, NT, S>;
  constexpr int kA = Shape::kA, kB = Shape::kB, kBT = Shape::kBT, kStage = Shape::kStage;
  extern __shared__ uint4 smem[];
  pdl_begin();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  const int wm = warp % WM, wn = warp / WM;
  const int groups = K / kGroup, tiles = N / 8, m0 = blockIdx.x * Shape::kBM, tile0 = blockIdx.y * kBT;

  // A thread's copies are the same every step but for the group: sources and destinations are
  // set up once (computed per copy, the address arithmetic outweighed the math).
  constexpr int kThreads = kWarps * 32, kXCopies = kA / kThreads, kWCopies = kB / kThreads;
  static_assert(kA % kThreads == 0 && kB % kThreads == 0 && 2 * kBT <= kThreads, "copy split");
  const int tid = threadIdx.x, xrow = tid / 16, xch = tid % 16, wtile = tid / 32;
  const uint32_t ring = smem_addr(smem);
  // x: rows xrow + 16 r (same parity, so the same swizzle), chunk xch.
  const uint32_t x_dst = ring + (xrow * 16 + swizzle(xrow, xch)) * 16;
  const __half* x_src = x + size_t(m0 + xrow) * K + xch * 8;
  const size_t x_step = size_t(16) * K;
  // weights: tiles wtile + 8 r, lane tid % 32.
  const uint32_t w_dst = ring + (kA + tid) * 16;
  const uint4* w_src = packed + size_t(tile0 + wtile) * groups * 32 + tid % 32;
  const size_t w_step = size_t(kThreads / 32) * groups * 32;
  // scales (threads < kBT) and zeros (the next kBT threads), one tile each.
  const int st_tile = tile0 + tid % kBT;
  const bool st_ok = tid < 2 * kBT && st_tile < tiles;
  const __half* st_src = (tid < kBT ? scales : zeros) + size_t(st_ok ? st_tile : 0) * 8;
  const uint32_t st_dst = ring + (kA + kB + tid) * 16;

  auto issue = [&](int grp) {
    if (grp < groups) {
      const uint32_t slot = (grp % S) * kStage * 16;
#pragma unroll
      for (int r = 0; r < kXCopies; ++r) {
        const bool ok = m0 + xrow + 16 * r < M;
        cp_async16(x_dst + slot + r * kThreads * 16, ok ? x_src + r * x_step + grp * kGroup : x, ok);
      }
#pragma unroll
      for (int r = 0; r < kWCopies; ++r) {
        const bool ok = tile0 + wtile + 8 * r < tiles;
        cp_async16(w_dst + slot + r * kThreads * 16, ok ? w_src + r * w_step + grp * 32 : packed, ok);
      }
      if (tid < 2 * kBT) cp_async16(st_dst + slot, st_src + size_t(grp) * N, st_ok);
    }
    cp_async_commit();  // empty groups too: the count of pending groups stays uniform
  };
#pragma unroll
  for (int i = 0; i < S - 1; ++i) issue(i);

  // The lane's A chunks: row g (+ 8, + 16 mt: same parity), chunk 4c + j at 4c + (j ^ a_flip).
  const int a_lane = g * 16 + 4 * c, a_flip = swizzle(g, 4 * c) - 4 * c;

  float acc[MT][NT][4] = {};
  for (int grp = 0; grp < groups; ++grp) {
    cp_async_wait<S - 2>();
    __syncthreads();  // the stage landed for every thread; every warp is done with the previous one
    issue(grp + S - 1);
    const uint4* st = smem + (grp % S) * kStage;
    const __half* sc = reinterpret_cast<const __half*>(st + kA + kB);
    const __half* zr = sc + kBT * 8;

    uint4 q[NT];
    __half2 scale[NT];  // the lane's B column g
    Zero zero[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      q[nt] = st[kA + (wn * NT + nt) * 32 + lane];
      scale[nt] = __half2half2(sc[(wn * NT + nt) * 8 + g]);
      zero[nt] = Zero(zr[(wn * NT + nt) * 8 + g]);
    }
    const uint4* a_rows = st + a_lane + wm * MT * 16 * 16;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint4 a[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) a[mt][h] = a_rows[(16 * mt + 8 * h) * 16 + (j ^ a_flip)];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t b[4];
        dequant_word(word(q[nt], j), zero[nt], b);
#pragma unroll
        for (int i = 0; i < 4; ++i) b[i] = as_u32(__hmul2(as_h2(b[i]), scale[nt]));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(acc[mt][nt], a[mt][0].x, a[mt][1].x, a[mt][0].y, a[mt][1].y, b[0], b[1]);  // k-tile 2j
          mma16816(acc[mt][nt], a[mt][0].z, a[mt][1].z, a[mt][0].w, a[mt][1].w, b[2], b[3]);  // k-tile 2j + 1
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int tile = tile0 + wn * NT + nt;
    if (tile >= tiles) continue;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + (wm * MT + mt) * 16 + g + 8 * h;
        if (row < M)
          *reinterpret_cast<float2*>(y + size_t(row) * N + tile * 8 + 2 * c) =
              make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
      }
  }
}

template <int MT, int WM, int NT, int S>
void launch(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales, const __half* zeros,
            float* y, cudaStream_t s) {
  using Shape = GemmShape<MT, WM, NT, S>;
  allow_dynamic_smem<w4a16_gemm_kernel<MT, WM, NT, S>>(Shape::kSmem);
  const dim3 grid(unsigned((M + Shape::kBM - 1) / Shape::kBM), unsigned((N / 8 + Shape::kBT - 1) / Shape::kBT));
  launch_kernel(w4a16_gemm_kernel<MT, WM, NT, S>, grid, kWarps * 32, Shape::kSmem, s, x, M, K, N,
                reinterpret_cast<const uint4*>(packed), scales, zeros, y);
}

}  // namespace

void w4a16_gemm(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales,
                const __half* zeros, float* y, cudaStream_t s, int variant) {
  if (M < 1 || K % kGroup || N % 8) fail("w4a16_gemm: unsupported shape M={} K={} N={} (K % 128, N % 8)", M, K, N);
  // Block shapes: 32 x 64 for few rows; from 33 rows 64 x 128, or 64 x 64 where 128-wide blocks
  // would leave SMs idle (variant 1: always 64 x 64). Measured and dropped: 128 x 128 (one block
  // per SM), 10-30% faster than these at M = 512 but still 1.4-1.6x slower than dequantize + cuBLAS.
  if (M <= 32) return launch<2, 1, 1, 4>(x, M, K, N, packed, scales, zeros, y, s);
  const long wide_blocks = long((M + 63) / 64) * ((N / 8 + 15) / 16);
  if (variant == 0 && wide_blocks >= 2L * sm_count()) return launch<2, 2, 4, 4>(x, M, K, N, packed, scales, zeros, y, s);
  launch<2, 2, 2, 4>(x, M, K, N, packed, scales, zeros, y, s);
}

}  // namespace tmkit::cuda
