// What the W4A16 kernels share (w4a16_gemv.cu for few rows, w4a16_gemm.cu for many): the packed
// weight layout, its exact dequantization into mma fragments, and the mbarrier and bulk-copy
// instructions (the tensor-core and cp.async ones are mma.cuh's).
//
// Why tensor cores even for a GEMV: at M = 1 the work is memory-bound, but an int4 weight streams
// at ~8.5e12 weights/s on an H200 against ~3.3e13 thread-instructions/s, so the kernel may spend
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
// row plays which k of the tile, as long as A (x) and B (W) agree, so the kernels map tile t's
// four k of lane c to the physical rows 32c + 4t .. 32c + 4t + 3: a lane then reads its x values
// as 4 contiguous uint4 per group and its weights as one uint4. Inside a word, nibbles 0 and 4
// land in the two halves of one half2 by one lop3 with 0x000f000f (| 0x6400 = 1024 + q), nibbles
// 1 and 5 with 0x00f000f0 (1024 + 16q); a shift by 8 brings 2, 6 and 3, 7: four half2 per word,
// = b0, b1 of two consecutive k-tiles.
// Dequantization: (1024 + q) - (1024 + z) and (1024 + 16q) / 16 - (64 + z) give q - z exactly
// for integer zeros 0..15 (W4Linear checks; other zeros take the dequantizing path). The GEMV
// applies the scale per group in fp32 to the group's mma accumulators, so it rounds no weight: the
// result is the exact product up to fp32 summation order (the GEMM rounds (q - z) * s to fp16).
#pragma once
#include <cuda_fp16.h>

#include <cstdint>

#include "mma.cuh"

namespace tmkit::cuda::w4 {

constexpr int kGroup = 128, kWarps = 8;

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

// mbarrier and the bulk copy engine (sm_90): one thread copies a contiguous global range into
// shared memory and the barrier's phase completes when its bytes have landed.
__device__ inline void mbar_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}
__device__ inline void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ inline void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// The producer's arrival, announcing the bytes the phase waits for.
__device__ inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// Until the phase of this parity completed (a fresh barrier counts parity 1 as completed).
__device__ inline void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) global -> shared, completing on `bar`.
__device__ inline void bulk_copy(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(smem)),
               "l"(gmem), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

// One box of a tiled tensor map (`map`: the address of a __grid_constant__ CUtensorMap) at
// element coordinates (x, y, z) -> shared memory, completing on `bar`.
__device__ inline void tma_load_3d(void* smem, const void* map, int x, int y, int z, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(
          smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(z), "r"(smem_addr(bar))
      : "memory");
}

__device__ inline uint32_t as_u32(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ inline __half2 as_h2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// fp16 constants by their bits: cuda_fp16's conversions are inline asm, which the compiler does
// not fold, so __float2half(1024.0f) would cost an instruction at every use.
__device__ __forceinline__ __half2 half2_bits(uint16_t bits) {
  const __half h = __ushort_as_half(bits);
  return __halves2half2(h, h);
}
constexpr uint16_t kHalf1024 = 0x6400, kHalf64 = 0x5400, kHalfSixteenth = 0x2c00;

// The zero point's two constants: (1024 + q) - (1024 + z) and (1024 + 16q) / 16 - (64 + z).
struct Zero {
  __half2 lo, hi;
  Zero() = default;
  __device__ explicit Zero(__half z) {
    const __half2 z2 = __halves2half2(z, z);
    lo = __hadd2(z2, half2_bits(kHalf1024));
    hi = __hneg2(__hadd2(z2, half2_bits(kHalf64)));
  }
};

// Word j of a lane's uint4 as four half2 of q - z: b[0], b[1] = k-tile 2j's pairs {2c, 2c+1} and
// {2c+8, 2c+9}; b[2], b[3] = the same of k-tile 2j + 1.
__device__ inline void dequant_word(uint32_t v, const Zero& z, uint32_t (&b)[4]) {
  const __half2 sixteenth = half2_bits(kHalfSixteenth);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    b[2 * half] = as_u32(__hsub2(as_h2(lop3_and_or(v, 0x000f000fu, 0x64006400u)), z.lo));
    b[2 * half + 1] = as_u32(__hfma2(as_h2(lop3_and_or(v, 0x00f000f0u, 0x64006400u)), sixteenth, z.hi));
    v >>= 8;
  }
}

__device__ __forceinline__ uint32_t word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

}  // namespace tmkit::cuda::w4
