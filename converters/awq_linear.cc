#include "awq_linear.h"

#include <cstring>

#include "error.h"

namespace tmkit {

namespace {

std::vector<uint8_t> unpack(const TensorView& v, int64_t rows, int64_t cols) {
  std::vector<int32_t> words(size_t(rows * cols / 8));
  std::memcpy(words.data(), v.data, words.size() * 4);
  return awq_unpack(words, rows, cols);
}

}  // namespace

AwqLinear read_awq_linear(const Checkpoint& ckpt, const std::string& base, int64_t K, int64_t N, int64_t group) {
  AwqLinear a;
  a.K = K;
  a.N = N;
  a.group = group;
  if (K % group || N % 8) fail("{}: [{} x {}] does not split into groups of {} rows and words of 8 columns", base, K, N, group);
  const auto check = [&](const std::string& suffix, DType t, std::vector<int64_t> shape) {
    const TensorView v = ckpt.get(base + suffix);
    if (v.dtype() != t || v.info->shape != shape)
      fail("{}: tensor '{}{}' is {} [{}], expected {} [{}] (AWQ GEMM, group {})", v.file, base, suffix,
           dtype_name(v.dtype()), fmt::join(v.info->shape, ", "), dtype_name(t), fmt::join(shape, ", "), group);
    return v;
  };
  a.codes = unpack(check("qweight", DType::I32, {K, N / 8}), K, N);
  a.zeros = unpack(check("qzeros", DType::I32, {K / group, N / 8}), K / group, N);
  const TensorView s = check("scales", DType::F16, {K / group, N});
  a.scales.resize(size_t(K / group * N));
  std::memcpy(a.scales.data(), s.data, a.scales.size() * 2);
  return a;
}

Int4Linear gather_int4(const std::vector<const AwqLinear*>& sources, const std::vector<std::pair<int, int64_t>>& cols,
                       int64_t row0, int64_t rows, int64_t group) {
  Int4Linear q;
  q.K = rows;
  q.N = int64_t(cols.size());
  q.group = group;
  if (q.N % 8 || row0 % group || rows % group) fail("int4: a rank slice of {} rows at {} x {} columns is not aligned to the group {}", rows, row0, q.N, group);
  q.qweight.assign(size_t(q.K * q.N / 8), 0);
  q.scales.assign(size_t(q.K / group * q.N), 0);
  q.zeros.assign(q.scales.size(), 0);
  for (int64_t c = 0; c < q.N; ++c) {
    const auto [si, sc] = cols[size_t(c)];
    if (si < 0) continue;  // padding: code, zero point and scale 0
    const AwqLinear& s = *sources[size_t(si)];
    for (int64_t k = 0; k < rows && row0 + k < s.K; ++k)
      q.qweight[size_t(k * (q.N / 8) + c / 8)] |= int32_t(uint32_t(s.codes[size_t((row0 + k) * s.N + sc)]) << (4 * (c % 8)));
    for (int64_t g = 0; g < rows / group && (row0 / group + g) < s.K / group; ++g) {
      const size_t src = size_t((row0 / group + g) * s.N + sc), dst = size_t(g * q.N + c);
      q.scales[dst] = s.scales[src];
      q.zeros[dst] = float_to_half(float(s.zeros[src]));
    }
  }
  return q;
}

}  // namespace tmkit
