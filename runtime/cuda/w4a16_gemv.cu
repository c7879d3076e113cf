// W4A16 for few rows (M <= 32: decode and small batches), warps splitting K:
// Y[M, N] (fp32) = X[M, K] (fp16) * W[K, N], W int4 packed as w4a16_common.cuh explains.
//
// Why split K inside a block: a 4096 x 4096 layer is only 512 columns of 8 at M = 1; giving each
// block a few column tiles and all of K would leave most of the GPU idle. Here a block owns 8-16
// columns and its 8 warps take every 8th group of K each, meeting once in shared memory at the
// end (in warp order: deterministic).
//
// For M <= 16 and N % 16 == 0, w4a16_stream.cu is faster (it replaced this file's swapped-operand
// GEMV, whose operand order it keeps); this kernel takes the remaining shapes and M = 17 .. 32.
// w4a16_splitk_kernel keeps x as A: MT m16 row tiles and NT column tiles per block.
#include "kernels.h"
#include "w4a16_common.cuh"

namespace tmkit::cuda {

namespace {

using namespace w4;

// The block's warps hold partials of the same outputs (kRegs accumulators per lane); they meet in
// shared memory and are added in warp order, so results do not depend on timing. place(i, lane)
// is the (row, column) of accumulator i of that lane; rows from M on are not stored.
template <int kRegs, typename Place>
__device__ inline void reduce_warps_and_store(const float (&acc)[kRegs], float* red, int M, int N, float* y,
                                              Place place) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < kRegs; ++i) red[(warp * kRegs + i) * 32 + lane] = acc[i];
  __syncthreads();
  for (int idx = threadIdx.x; idx < kRegs * 32; idx += kWarps * 32) {
    const int i = idx / 32, l = idx % 32;
    const int2 at = place(i, l);
    if (at.x >= M) continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[(w * kRegs + i) * 32 + l];
    y[size_t(at.x) * N + at.y] = sum;
  }
}

// One group's loads for one 8-column tile: the lane's 32 codes, its column's zero, and the
// scales of the two columns its accumulators hold (2c, 2c + 1).
struct Unit {
  uint4 q;
  __half z;
  __half2 s;
};

// MT m16 row tiles (rows16: rows g + 8 of each tile exist, i.e. M > 8), NT column tiles, P groups
// of loads in flight per warp (in registers).
template <int MT, bool kRows16, int NT, int P>
__global__ void __launch_bounds__(kWarps * 32)
    w4a16_splitk_kernel(const __half* __restrict__ x, int M, int K, int N, const uint4* __restrict__ packed,
                        const __half* __restrict__ scales, const __half* __restrict__ zeros, float* __restrict__ y) {
  constexpr int kRegs = MT * NT * 4;
  __shared__ float red[kWarps * kRegs * 32];
  pdl_begin();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  const int groups = K / kGroup, m0 = blockIdx.x * 16 * MT, tile0 = blockIdx.y * NT;

  float acc[MT][NT][4] = {};

  auto load_units = [&](int grp, Unit (&u)[NT]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int tile = tile0 + nt;
      u[nt].q = load_stream(packed + (size_t(tile) * groups + grp) * 32 + lane);
      u[nt].z = zeros[size_t(grp) * N + tile * 8 + g];
      u[nt].s = *reinterpret_cast<const __half2*>(scales + size_t(grp) * N + tile * 8 + 2 * c);
    }
  };

  // P groups' weights in flight per warp: slot i holds group base + i * kWarps; consuming a slot
  // refills it with the group P steps ahead.
  Unit buf[P][NT];
#pragma unroll
  for (int i = 0; i < P; ++i)
    if (warp + i * kWarps < groups) load_units(warp + i * kWarps, buf[i]);
  for (int base = warp; base < groups; base += P * kWarps) {
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int grp = base + i * kWarps;
      if (grp >= groups) break;  // uniform across the warp
      Unit cur[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) cur[nt] = buf[i][nt];
      if (grp + P * kWarps < groups) load_units(grp + P * kWarps, buf[i]);

      // The lane's x values: rows g and g + 8 of each m-tile, physical k = 32c .. 32c + 31. Rows
      // past M read row M - 1 instead: their products land in output rows that are never stored.
      uint4 a[MT][2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (h == 1 && !kRows16) {
#pragma unroll
            for (int j = 0; j < 4; ++j) a[mt][h][j] = make_uint4(0, 0, 0, 0);
            continue;
          }
          const int row = min(m0 + 16 * mt + g + 8 * h, M - 1);
          const uint4* src = reinterpret_cast<const uint4*>(x + size_t(row) * K + grp * kGroup + 32 * c);
#pragma unroll
          for (int j = 0; j < 4; ++j) a[mt][h][j] = __ldg(src + j);
        }

      float gacc[MT][NT][4] = {};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const Zero zero(cur[nt].z);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t b[4];
          dequant_word(word(cur[nt].q, j), zero, b);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint4& lo = a[mt][0][j];
            const uint4& hi = a[mt][1][j];
            mma16816(gacc[mt][nt], lo.x, hi.x, lo.y, hi.y, b[0], b[1]);  // k-tile 2j
            mma16816(gacc[mt][nt], lo.z, hi.z, lo.w, hi.w, b[2], b[3]);  // k-tile 2j + 1
          }
        }
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float2 s = __half22float2(cur[nt].s);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          acc[mt][nt][0] += s.x * gacc[mt][nt][0];
          acc[mt][nt][1] += s.y * gacc[mt][nt][1];
          acc[mt][nt][2] += s.x * gacc[mt][nt][2];
          acc[mt][nt][3] += s.y * gacc[mt][nt][3];
        }
      }
    }
  }

  reduce_warps_and_store<kRegs>(reinterpret_cast<const float(&)[kRegs]>(acc), red, M, N, y, [&](int i, int l) {
    const int r = i % 4, nt = (i / 4) % NT, mt = i / (4 * NT);
    return make_int2(m0 + 16 * mt + l / 4 + (r >= 2 ? 8 : 0), (tile0 + nt) * 8 + 2 * (l % 4) + (r & 1));
  });
}

using Launch = void (*)(const __half*, int, int, int, const uint32_t*, const __half*, const __half*, float*,
                        cudaStream_t);

template <int MT, bool kRows16, int NT, int P>
void launch_splitk(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales,
                   const __half* zeros, float* y, cudaStream_t s) {
  const dim3 grid(unsigned((M + 16 * MT - 1) / (16 * MT)), unsigned(N / (8 * NT)));
  launch_kernel(w4a16_splitk_kernel<MT, kRows16, NT, P>, grid, kWarps * 32, 0, s, x, M, K, N,
                reinterpret_cast<const uint4*>(packed), scales, zeros, y);
}

}  // namespace

void w4a16_gemv(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales,
                const __half* zeros, float* y, cudaStream_t s, int variant) {
  if (M < 1 || M > 32 || K % kGroup || N % 8)
    fail("w4a16_gemv: unsupported shape M={} K={} N={} (M <= 32, K % 128, N % 8)", M, K, N);
  Launch f = nullptr;
  if (M <= 16) f = launch_splitk<1, true, 1, 2>;
  else f = N % 16 == 0 ? (variant ? launch_splitk<2, true, 2, 1> : launch_splitk<2, true, 1, 2>) : launch_splitk<2, true, 1, 1>;
  f(x, M, K, N, packed, scales, zeros, y, s);
}

}  // namespace tmkit::cuda
