// The int4 weight layout of TurboMind workspaces (lmdeploy v0.6, spec §6.2). A linear [K, N]
// (input K, output N, as every workspace linear) is stored as
//   <name>.qweight  int32 [K, N/8]  sequential nibbles along N: column 8w + j at bits 4j of word w
//   <name>.scales   fp16  [K/g, N]  per group of g rows (input channels) and column
//   <name>.zeros    fp16  [K/g, N]  the integer zero point, as a float
// and w = (q - zero) * scale, rounded to fp16 as the reference (PyTorch, fp16) computes it.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "error.h"

#include "dtype.h"

namespace tmkit {

struct Int4Linear {
  int64_t K = 0, N = 0, group = 128;
  std::vector<int32_t> qweight;  // [K, N/8]
  std::vector<uint16_t> scales, zeros;  // fp16 bits, [K/group, N]
};

inline int int4_code(const Int4Linear& q, int64_t k, int64_t n) {
  return (uint32_t(q.qweight[size_t(k * (q.N / 8) + n / 8)]) >> (4 * (n % 8))) & 0xf;
}

inline float int4_dequant(int code, uint16_t scale, uint16_t zero) {
  return half_to_float(float_to_half((float(code) - half_to_float(zero)) * half_to_float(scale)));
}

// Side by side: the columns [begin, begin + count) of each part (begin and count multiples of 8,
// equal K and group), in order. Merges TP ranks split on the output dim, and q|k|v or w1|w3.
struct Int4Columns { const Int4Linear* q; int64_t begin, count; };
inline Int4Linear concat_columns(const std::vector<Int4Columns>& parts) {
  Int4Linear out;
  out.K = parts.at(0).q->K;
  out.group = parts[0].q->group;
  for (const auto& p : parts) out.N += p.count;
  out.qweight.resize(size_t(out.K * out.N / 8));
  out.scales.resize(size_t(out.K / out.group * out.N));
  out.zeros.resize(out.scales.size());
  int64_t col = 0;
  for (const auto& p : parts) {
    const Int4Linear& s = *p.q;
    for (int64_t k = 0; k < out.K; ++k)
      for (int64_t w = 0; w < p.count / 8; ++w)
        out.qweight[size_t(k * (out.N / 8) + col / 8 + w)] = s.qweight[size_t(k * (s.N / 8) + p.begin / 8 + w)];
    for (int64_t g = 0; g < out.K / out.group; ++g)
      for (int64_t n = 0; n < p.count; ++n) {
        out.scales[size_t(g * out.N + col + n)] = s.scales[size_t(g * s.N + p.begin + n)];
        out.zeros[size_t(g * out.N + col + n)] = s.zeros[size_t(g * s.N + p.begin + n)];
      }
    col += p.count;
  }
  return out;
}

// Stacked: all rows of each part in order (equal N and group; K multiples of group). Merges TP
// ranks split on the input dim (wo, w2).
inline Int4Linear concat_rows(const std::vector<const Int4Linear*>& parts) {
  Int4Linear out = *parts.at(0);
  for (size_t i = 1; i < parts.size(); ++i) {
    out.K += parts[i]->K;
    out.qweight.insert(out.qweight.end(), parts[i]->qweight.begin(), parts[i]->qweight.end());
    out.scales.insert(out.scales.end(), parts[i]->scales.begin(), parts[i]->scales.end());
    out.zeros.insert(out.zeros.end(), parts[i]->zeros.begin(), parts[i]->zeros.end());
  }
  return out;
}

// Dequantized weights [K, N], row-major.
inline std::vector<float> dequantize(const Int4Linear& q) {
  std::vector<float> w(size_t(q.K * q.N));
  for (int64_t k = 0; k < q.K; ++k)
    for (int64_t n = 0; n < q.N; ++n) {
      const size_t g = size_t((k / q.group) * q.N + n);
      w[size_t(k * q.N + n)] = int4_dequant(int4_code(q, k, n), q.scales[g], q.zeros[g]);
    }
  return w;
}

// AutoAWQ "GEMM" packing (../shared/specs/awq.md §6.1), the input side of AWQ checkpoints:
// A linear W[out = N, in = K] quantized and packed in the AutoAWQ GEMM layout (what the hf-awq
// writer stores; the GPU AWQ search hands its linears over this way).
struct AwqPackedLinear {
  int64_t K = 0, N = 0, group = 128;
  std::vector<int32_t> qweight;  // [K, N/8], codes packed by awq_pack
  std::vector<int32_t> qzeros;   // [K/group, N/8], zero points packed by awq_pack
  std::vector<uint16_t> scales;  // [K/group, N] fp16 bits
  bool operator==(const AwqPackedLinear&) const = default;
};

// codes [K, N] (0..15, row-major) <-> int32 [K, N/8] with nibble i of word j = column 8j + kAwqOrder[i].
inline constexpr std::array<int, 8> kAwqOrder = {0, 2, 4, 6, 1, 3, 5, 7};

inline std::vector<int32_t> awq_pack(const std::vector<uint8_t>& codes, int64_t K, int64_t N) {
  if (N % 8 || int64_t(codes.size()) != K * N) fail("awq_pack: {} codes for a [{}, {}] matrix (N % 8 == 0)", codes.size(), K, N);
  std::vector<int32_t> out(size_t(K * N / 8));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N / 8; ++j) {
      uint32_t word = 0;
      for (int i = 0; i < 8; ++i) word |= uint32_t(codes[size_t(k * N + 8 * j + kAwqOrder[size_t(i)])] & 0xf) << (4 * i);
      out[size_t(k * (N / 8) + j)] = int32_t(word);
    }
  return out;
}

inline std::vector<uint8_t> awq_unpack(const std::vector<int32_t>& packed, int64_t K, int64_t N) {
  if (N % 8 || int64_t(packed.size()) * 8 != K * N) fail("awq_unpack: {} words for a [{}, {}] matrix", packed.size(), K, N);
  std::vector<uint8_t> codes(size_t(K * N));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N / 8; ++j) {
      const uint32_t word = uint32_t(packed[size_t(k * (N / 8) + j)]);
      for (int i = 0; i < 8; ++i) codes[size_t(k * N + 8 * j + kAwqOrder[size_t(i)])] = uint8_t((word >> (4 * i)) & 0xf);
    }
  return codes;
}

}  // namespace tmkit
