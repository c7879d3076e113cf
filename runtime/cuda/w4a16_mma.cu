// W4A16 on tensor cores: Y[M, N] (fp32) = X[M, K] (fp16) * W[K, N], W int4 with group 128, for
// M <= 32 (decode and small batches; longer inputs dequantize and use cuBLAS, which is faster from
// M ~ 48: this kernel reads x from L2 per warp, without a shared-memory tile; a Marlin-style
// GEMM would be the next step for batches).
//
// Why tensor cores for a GEMV: at M = 1 the work is memory-bound, but an int4 weight streams at
// ~8.5e12 weights/s on an H200 against ~3.3e13 thread-instructions/s, so the kernel may spend
// < 4 instructions per weight. mma.sync m16n8k16 does the multiply-adds of 128 weights in one
// instruction (15/16 of it idle at M = 1, which costs nothing), leaving the dequantization:
// 1 lop3 + 1 fp16 sub/fma per 2 weights, with exact fp32 accumulation.
//
// Packed layout (built once by w4_pack from TurboMind's v0.6 qweight; see ../w4a16_linear.h).
// One "unit" = 8 output columns x one group of 128 input rows = 512 bytes = 32 uint4, one per
// lane of a warp:
//   packed[(tile * (K / 128) + group) * 32 + lane]   tile = n / 8, lane = 4 * (n % 8) + c
// Lane (col, c) holds column n's 32 weights k = 32c .. 32c + 31 of the group: word j (of 4) holds
// k = 32c + 8j + e, e = 0..7, at nibble [0, 4, 1, 5, 2, 6, 3, 7][e].
// Why that order: mma's B fragment gives lane (col = lane / 4, c = lane % 4) the k-pairs
// {2c, 2c+1} and {2c+8, 2c+9} of each 16-row tile. The reduction does not care which physical
// row plays which k of the tile, as long as A (x) and B (W) agree, so the kernel maps tile t's
// four k of lane c to the physical rows 32c + 4t .. 32c + 4t + 3: a lane then reads its x values
// as 4 contiguous uint4 per group and its weights as one uint4. Inside a word, nibbles 0 and 4
// land in the two halves of one half2 by one lop3 with 0x000f000f (| 0x6400 = 1024 + q), nibbles
// 1 and 5 with 0x00f000f0 (1024 + 16q); a shift by 8 brings 2, 6 and 3, 7: four half2 per word,
// = b0, b1 of two consecutive k-tiles.
// Dequantization: (1024 + q) - (1024 + z) and (1024 + 16q) / 16 - (64 + z) give q - z exactly
// for integer zeros 0..15 (W4Linear checks; other zeros take the dequantizing path). The scale
// is applied per group in fp32 to the group's mma accumulators, so nothing here rounds a weight:
// the result is the exact product up to fp32 summation order.
//
// Work split: a block owns NT 8-column tiles and MT m16 tiles of rows; its 8 warps split K
// (warp w takes groups w, w + 8, ...), each streaming its units with the next group's loads in
// flight, and meet once in shared memory (in warp order: deterministic). x comes straight from
// global memory (read-only path, L1-resident for small M), weights bypass L1. M <= 16 runs the
// swapped GEMV form below (w4a16_gemv_kernel), M <= 32 this one.
#include "kernels.h"

namespace tmkit::cuda {

namespace {

constexpr int kWarps = 8, kGroup = 128;

__device__ inline uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(b), "r"(c));  // (a & b) | c
  return d;
}

__device__ inline uint4 load_stream(const uint4* p) {  // read once: do not keep it in L1
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ inline void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ inline uint32_t as_u32(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ inline __half2 as_h2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// The zero point's two constants: (1024 + q) - (1024 + z) and (1024 + 16q) / 16 - (64 + z).
struct Zero {
  __half2 lo, hi;
  __device__ explicit Zero(__half z)
      : lo(__half2half2(__hadd(z, __float2half(1024.0f)))), hi(__half2half2(__hneg(__hadd(z, __float2half(64.0f))))) {}
};

// Word j of a lane's uint4 as four half2 of q - z: b[0], b[1] = k-tile 2j's pairs {2c, 2c+1} and
// {2c+8, 2c+9}; b[2], b[3] = the same of k-tile 2j + 1.
__device__ inline void dequant_word(uint32_t v, const Zero& z, uint32_t (&b)[4]) {
  const __half2 sixteenth = __float2half2_rn(0.0625f);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    b[2 * half] = as_u32(__hsub2(as_h2(lop3_and_or(v, 0x000f000fu, 0x64006400u)), z.lo));
    b[2 * half + 1] = as_u32(__hfma2(as_h2(lop3_and_or(v, 0x00f000f0u, 0x64006400u)), sixteenth, z.hi));
    v >>= 8;
  }
}

// The block's warps hold partials of the same outputs (kRegs accumulators per lane); they meet in
// shared memory and are added in warp order, so results do not depend on timing. place(i, lane)
// is the (row, column) of accumulator i of that lane; rows from M on are not stored.
template <int kRegs, typename Place>
__device__ inline void reduce_warps_and_store(const float (&acc)[kRegs], float (&red)[kWarps][kRegs][32], int M, int N,
                                              float* y, Place place) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < kRegs; ++i) red[warp][i][lane] = acc[i];
  __syncthreads();
  for (int idx = threadIdx.x; idx < kRegs * 32; idx += kWarps * 32) {
    const int i = idx / 32, l = idx % 32;
    const int2 at = place(i, l);
    if (at.x >= M) continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[w][i][l];
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
// of loads in flight per warp.
template <int MT, bool kRows16, int NT, int P>
__global__ void __launch_bounds__(kWarps * 32) w4a16_mma_kernel(const __half* __restrict__ x, int M, int K, int N,
                                                               const uint4* __restrict__ packed,
                                                               const __half* __restrict__ scales,
                                                               const __half* __restrict__ zeros, float* __restrict__ y) {
  constexpr int kRegs = MT * NT * 4;
  __shared__ float red[kWarps][kRegs][32];
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

    // The lane's x values: rows g and g + 8 of each m-tile, physical k = 32c .. 32c + 31. Rows past
    // M read row M - 1 instead: their products land in output rows that are never stored.
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
      const uint32_t words[4] = {cur[nt].q.x, cur[nt].q.y, cur[nt].q.z, cur[nt].q.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t b[4];
        dequant_word(words[j], zero, b);
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

// M <= 16: the roles swap. A = W^T (16 columns: the lane's column g of tiles 2p and 2p + 1,
// whose B-fragment pairs are exactly A's a0/a2 and a1/a3), B = x^T (8 rows of x per mma: lane
// (g, c) holds row g's pairs {2c, 2c+1}, {2c+8, 2c+9} of a k-tile, the same uint4 loads as above).
// One mma then covers 256 weights instead of 128, and each x register feeds NP column pairs.
// Accumulator d of pair p: d0, d1 = column (2p) * 8 + g at rows 2c, 2c + 1; d2, d3 = column
// (2p + 1) * 8 + g at the same rows. Even and odd k-tiles accumulate apart (two chains of
// dependent mmas instead of one). MB row blocks of 8 (M <= 8: 1, M <= 16: 2).
template <int MB, int NP, int P>
__global__ void __launch_bounds__(kWarps * 32, MB == 1 ? 3 : 2) w4a16_gemv_kernel(const __half* __restrict__ x, int M, int K, int N,
                                                                const uint4* __restrict__ packed,
                                                                const __half* __restrict__ scales,
                                                                const __half* __restrict__ zeros, float* __restrict__ y) {
  constexpr int kRegs = MB * NP * 4;
  __shared__ float red[kWarps][kRegs][32];
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
        const uint32_t w0[4] = {cur.q[2 * p].x, cur.q[2 * p].y, cur.q[2 * p].z, cur.q[2 * p].w};
        const uint32_t w1[4] = {cur.q[2 * p + 1].x, cur.q[2 * p + 1].y, cur.q[2 * p + 1].z, cur.q[2 * p + 1].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t b0[4], b1[4];
          dequant_word(w0[j], z0, b0);
          dequant_word(w1[j], z1, b1);
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

// packed word o (see the layout above) from qweight [K, N/8] (v0.6: column 8w + j at bits 4j).
__global__ void w4_pack_kernel(const uint32_t* __restrict__ qweight, int K, int N, uint32_t* __restrict__ packed) {
  const size_t o = size_t(blockIdx.x) * blockDim.x + threadIdx.x, groups = size_t(K) / kGroup;
  if (o >= size_t(K) * N / 8) return;
  const int j = int(o % 4), lane = int((o / 4) % 32);
  const size_t unit = o / 128, grp = unit % groups, tile = unit / groups;
  const int col = lane / 4, c = lane % 4;
  constexpr int kNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  uint32_t word = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const size_t k = grp * kGroup + 32 * c + 8 * j + e;
    word |= ((qweight[k * (N / 8) + tile] >> (4 * col)) & 0xfu) << (4 * kNibble[e]);
  }
  packed[o] = word;
}

// w[k, n] = fp16((q - z) * s) for 8 rows k = 8 kk .. 8 kk + 7 of column n per thread (n fastest:
// the stores coalesce).
__global__ void w4_dequant_packed_kernel(const uint32_t* __restrict__ packed, const __half* __restrict__ scales,
                                         const __half* __restrict__ zeros, int K, int N, __half* __restrict__ w) {
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x, groups = size_t(K) / kGroup;
  if (i >= size_t(K) / 8 * N) return;
  const size_t n = i % size_t(N), kk = i / size_t(N), grp = kk / 16;
  const int c = int(kk % 16) / 4, j = int(kk % 4);
  const uint32_t word = packed[(((n / 8) * groups + grp) * 32 + 4 * (n % 8) + c) * 4 + j];
  const float s = __half2float(scales[grp * N + n]), z = __half2float(zeros[grp * N + n]);
  constexpr int kNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};
#pragma unroll
  for (int e = 0; e < 8; ++e)
    w[(kk * 8 + e) * N + n] = __float2half_rn((float((word >> (4 * kNibble[e])) & 0xfu) - z) * s);
}

// Block shapes by rows, measured with bench-kernels: `variant` 0 or 1 picks the column tiles and
// the depth of the weight prefetch. More column tiles per warp amortize the per-group work (x
// loads, zero and scale handling), which bounds the kernel at M = 1 (ncu: issue-bound).
template <int MT, bool kRows16, int NT, int P>
void launch(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales, const __half* zeros,
            float* y, cudaStream_t s) {
  const dim3 grid(unsigned((M + 16 * MT - 1) / (16 * MT)), unsigned(N / (8 * NT)));
  w4a16_mma_kernel<MT, kRows16, NT, P><<<grid, kWarps * 32, 0, s>>>(x, M, K, N, reinterpret_cast<const uint4*>(packed),
                                                                    scales, zeros, y);
  TMKIT_CUDA_LAUNCHED();
}

template <int MB, int NP, int P>
void launch_gemv(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales, const __half* zeros,
                 float* y, cudaStream_t s) {
  w4a16_gemv_kernel<MB, NP, P><<<unsigned(N / (16 * NP)), kWarps * 32, 0, s>>>(
      x, M, K, N, reinterpret_cast<const uint4*>(packed), scales, zeros, y);
  TMKIT_CUDA_LAUNCHED();
}

}  // namespace

void w4_pack(const uint32_t* qweight, int K, int N, uint32_t* packed, cudaStream_t s) {
  if (K % kGroup || N % 8) fail("w4_pack: K = {} must be a multiple of {} and N = {} of 8", K, kGroup, N);
  const size_t words = size_t(K) * N / 8;
  w4_pack_kernel<<<unsigned((words + 255) / 256), 256, 0, s>>>(qweight, K, N, packed);
  TMKIT_CUDA_LAUNCHED();
}

void w4_dequant_packed(const uint32_t* packed, const __half* scales, const __half* zeros, int K, int N, __half* w,
                       cudaStream_t s) {
  const size_t threads = size_t(K) / 8 * N;
  w4_dequant_packed_kernel<<<unsigned((threads + 255) / 256), 256, 0, s>>>(packed, scales, zeros, K, N, w);
  TMKIT_CUDA_LAUNCHED();
}

void w4a16_mma(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales, const __half* zeros,
               float* y, cudaStream_t s, int variant) {
  if (M < 1 || M > 32 || K % kGroup || N % 8)
    fail("w4a16_mma: unsupported shape M={} K={} N={} (M <= 32, K % 128, N % 8)", M, K, N);
  using Launch = void (*)(const __half*, int, int, int, const uint32_t*, const __half*, const __half*, float*, cudaStream_t);
  Launch f = nullptr;
  if (M <= 16 && N % 16 == 0) {
    const bool wide = N % 32 == 0 && variant == 1;  // M <= 8: deeper prefetch instead
    if (M <= 8) f = variant == 1 ? launch_gemv<1, 1, 3> : launch_gemv<1, 1, 2>;
    else f = wide ? launch_gemv<2, 2, 1> : launch_gemv<2, 1, 2>;
  } else if (M <= 16) f = launch<1, true, 1, 2>;
  else f = N % 16 == 0 ? (variant ? launch<2, true, 2, 1> : launch<2, true, 1, 2>) : launch<2, true, 1, 1>;
  f(x, M, K, N, packed, scales, zeros, y, s);
}

}  // namespace tmkit::cuda
