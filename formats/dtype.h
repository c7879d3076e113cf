// Element types of checkpoints and workspaces, and the scalar conversions between them.
// Conversions round to nearest even, as PyTorch's .half() / .bfloat16() do, so that files
// written by tmkit are bit-identical to what the reference tools write.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace tmkit {

enum class DType { F32, F16, BF16, I32, I8, U8 };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);  // safetensors spelling: "F32", "BF16", ...
bool parse_dtype(std::string_view s, DType* out);
bool is_float(DType t);

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    float f = float(man) * (1.0f / 16777216.0f);  // subnormal: man * 2^-24
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

// float -> IEEE half, round to nearest even; finite values too large become +-inf.
inline uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                  // result is subnormal or zero
    float r = bits_to_float(a) * 16777216.0f;             // exact scaling to units of 2^-24
    uint32_t m = uint32_t(r);
    float rem = r - float(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return uint16_t(sign | m);
  }
  uint32_t e = (a >> 23) - 112, man = a & 0x7fffffu;
  uint32_t h = (e << 10) | (man >> 13);
  uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

inline bool half_is_inf(uint16_t h) { return (h & 0x7fffu) == 0x7c00u; }

// Reads element i of a float-typed buffer as float.
inline float load_float(const void* p, DType t, size_t i) {
  switch (t) {
    case DType::F32: { float f; std::memcpy(&f, static_cast<const char*>(p) + 4 * i, 4); return f; }
    case DType::F16: { uint16_t h; std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2); return half_to_float(h); }
    case DType::BF16: { uint16_t h; std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2); return bf16_to_float(h); }
    default: return 0.0f;
  }
}

}  // namespace tmkit
