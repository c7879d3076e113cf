// The warp-level tensor-core instructions the kernels share (mma.sync m16n8k16 and ldmatrix, sm_80
// and later), for fp16 and bf16 inputs with fp32 accumulation, and cp.async, which feeds them.
//
// Fragment layouts (PTX ISA, "matrix fragments for mma.m16n8k16"); lane = 4 g + c:
//   A (16 x 16, row-major)  a0 = (row g, cols 2c, 2c+1)  a1 = (g + 8, 2c ..)  a2 = (g, 2c + 8 ..)  a3 = (g + 8, 2c + 8 ..)
//   B (16 x 8, k x n)       b0 = (k 2c, 2c+1; n g)       b1 = (k 2c + 8, 2c + 9; n g)
//   C, D (16 x 8, fp32)     d0, d1 = (row g, cols 2c, 2c+1)                d2, d3 = (row g + 8, the same)
// Each 32-bit register holds two 16-bit values, the lower column (or k) in the low half.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace tmkit::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without registers (L2 only); `valid` = false writes zeros instead.
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, bool valid = true) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {  // all but the newest kPending groups of this thread landed
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// d += A B with T = __half or __nv_bfloat16 inputs.
template <typename T = __half>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Four 8 x 8 matrices of 16-bit values from shared memory: lanes 8i .. 8i + 7 pass the addresses
// of matrix i's rows (16 bytes each); register i of lane (g, c) receives matrix i's row g, columns
// 2c and 2c + 1 (with .trans: column g, rows 2c and 2c + 1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// Two floats as one register of T (round to nearest), `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  uint32_t u;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    u = *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    u = *reinterpret_cast<const uint32_t*>(&h);
  }
  return u;
}

}  // namespace tmkit::cuda
