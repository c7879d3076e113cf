// W4A16 for few rows (M <= 32: decode and small batches), warps splitting K:
// Y[M, N] (fp32) = X[M, K] (fp16) * W[K, N], W int4 packed as w4a16_common.cuh explains.
//
// Why split K inside a block: a 4096 x 4096 layer is only 512 columns of 8 at M = 1; giving each
// block a few column tiles and all of K would leave most of the GPU idle. Here a block owns 8-16
// columns and its 8 warps take every 8th group of K each, meeting once in shared memory at the
// end (in warp order: deterministic).
//
// w4a16_gemv_kernel (M <= 16) swaps the mma operands, A = W^T (16 columns: the lane's column g of
// tiles 2p and 2p + 1, whose B-fragment pairs are exactly A's a0/a2 and a1/a3), B = x^T (8 rows
// of x per mma: lane (g, c) holds row g's pairs {2c, 2c+1}, {2c+8, 2c+9} of a k-tile). One mma
// then covers 256 weights instead of 128, and each x register feeds NP column pairs.
// Its loads run P groups ahead in registers. Measured and dropped (bench-kernels, H200): a
// cp.async ring of 4-8 stages per warp in shared memory, also as a persistent kernel whose ring
// runs on across column blocks; at M = 1 it was 3-19% slower on K = 4096 and 6% faster on
// K = 11008 (docs/performance.md).
//
// w4a16_splitk_kernel (M <= 32) keeps x as A: MT m16 row tiles and NT column tiles per block.
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

// MB row blocks of 8 (M <= 8: 1, M <= 16: 2), NP column pairs (16 columns each), P groups of
// loads in flight per warp (in registers).
template <int MB, int NP, int P>
__global__ void __launch_bounds__(kWarps * 32, MB == 1 ? 3 : 2) w4a16_gemv_kernel(const __half* __restrict__ x, int M, int K, int N,
                                                                const uint4* __restrict__ packed,
                                                                const __half* __restrict__ scales,
                                                                const __half* __restrict__ zeros, float* __restrict__ y) {
  constexpr int kRegs = MB * NP * 4;
  __shared__ float red[kWarps * kRegs * 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  const int groups = K / kGroup, tile0 = blockIdx.x * 2 * NP;

  struct Loads {
    uint4 q[2 * NP];
    __half z[2 * NP], s[2 * NP];
  };
  // Pointers of this warp's first group; each group step advances them by kWarps groups.
  const uint4* wp = packed + (size_t(tile0) * groups + warp) * 32 + lane;
  const size_t sz0 = size_t(warp) * N + tile0 * 8 + g;
  auto load = [&](int step, Loads& l) {
#pragma unroll
    for (int t = 0; t < 2 * NP; ++t) {
      l.q[t] = load_stream(wp + (size_t(t) * groups + size_t(step) * kWarps) * 32);
      const size_t i = sz0 + size_t(step) * kWarps * N + t * 8;
      l.z[t] = zeros[i];
      l.s[t] = scales[i];
    }
  };

  float acc[MB][NP][4] = {};

  const int steps = (groups - warp + kWarps - 1) / kWarps;  // groups warp, warp + 8, ...
  Loads buf[P];
#pragma unroll
  for (int i = 0; i < P; ++i)
    if (i < steps) load(i, buf[i]);
  for (int base = 0; base < steps; base += P) {
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int step = base + i;
      if (step >= steps) break;  // uniform across the warp
      const Loads cur = buf[i];
      if (step + P < steps) load(step + P, buf[i]);
      const int grp = warp + step * kWarps;

      uint4 xr[MB][4];  // rows g (+ 8), physical k = 32c .. 32c + 31 (rows past M: row M - 1, never stored)
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        const uint4* src = reinterpret_cast<const uint4*>(x + size_t(min(8 * mb + g, M - 1)) * K + grp * kGroup + 32 * c);
#pragma unroll
        for (int j = 0; j < 4; ++j) xr[mb][j] = __ldg(src + j);
      }
      float even[MB][NP][4] = {}, odd[MB][NP][4] = {};
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        const Zero z0(cur.z[2 * p]), z1(cur.z[2 * p + 1]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t b0[4], b1[4];
          dequant_word(word(cur.q[2 * p], j), z0, b0);
          dequant_word(word(cur.q[2 * p + 1], j), z1, b1);
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) {
            mma16816(even[mb][p], b0[0], b1[0], b0[1], b1[1], xr[mb][j].x, xr[mb][j].y);  // k-tile 2j
            mma16816(odd[mb][p], b0[2], b1[2], b0[3], b1[3], xr[mb][j].z, xr[mb][j].w);   // k-tile 2j + 1
          }
        }
      }
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        const float s0 = __half2float(cur.s[2 * p]), s1 = __half2float(cur.s[2 * p + 1]);
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          acc[mb][p][0] += s0 * (even[mb][p][0] + odd[mb][p][0]);
          acc[mb][p][1] += s0 * (even[mb][p][1] + odd[mb][p][1]);
          acc[mb][p][2] += s1 * (even[mb][p][2] + odd[mb][p][2]);
          acc[mb][p][3] += s1 * (even[mb][p][3] + odd[mb][p][3]);
        }
      }
    }
  }

  reduce_warps_and_store<kRegs>(reinterpret_cast<const float(&)[kRegs]>(acc), red, M, N, y, [&](int i, int l) {
    const int r = i % 4, p = (i / 4) % NP, mb = i / (4 * NP);
    return make_int2(8 * mb + 2 * (l % 4) + (r & 1), (tile0 + 2 * p + (r >= 2)) * 8 + l / 4);
  });
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

template <int MB, int NP, int P>
void launch_gemv(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales, const __half* zeros,
                 float* y, cudaStream_t s) {
  w4a16_gemv_kernel<MB, NP, P><<<unsigned(N / (16 * NP)), kWarps * 32, 0, s>>>(
      x, M, K, N, reinterpret_cast<const uint4*>(packed), scales, zeros, y);
  TMKIT_CUDA_LAUNCHED();
}

template <int MT, bool kRows16, int NT, int P>
void launch_splitk(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales,
                   const __half* zeros, float* y, cudaStream_t s) {
  const dim3 grid(unsigned((M + 16 * MT - 1) / (16 * MT)), unsigned(N / (8 * NT)));
  w4a16_splitk_kernel<MT, kRows16, NT, P><<<grid, kWarps * 32, 0, s>>>(
      x, M, K, N, reinterpret_cast<const uint4*>(packed), scales, zeros, y);
  TMKIT_CUDA_LAUNCHED();
}

}  // namespace

void w4a16_gemv(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales,
                const __half* zeros, float* y, cudaStream_t s, int variant) {
  if (M < 1 || M > 32 || K % kGroup || N % 8)
    fail("w4a16_gemv: unsupported shape M={} K={} N={} (M <= 32, K % 128, N % 8)", M, K, N);
  Launch f = nullptr;
  if (M <= 16 && N % 16 == 0) {
    if (M <= 8) f = variant == 1 ? launch_gemv<1, 1, 3> : launch_gemv<1, 1, 2>;  // deeper prefetch
    else f = variant == 0 && N % 32 == 0 ? launch_gemv<2, 2, 1> : launch_gemv<2, 1, 2>;  // 32 columns: faster
  } else if (M <= 16) {
    f = launch_splitk<1, true, 1, 2>;
  } else {
    f = N % 16 == 0 ? (variant ? launch_splitk<2, true, 2, 1> : launch_splitk<2, true, 1, 2>) : launch_splitk<2, true, 1, 1>;
  }
  f(x, M, K, N, packed, scales, zeros, y, s);
}

}  // namespace tmkit::cuda
