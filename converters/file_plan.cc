#include "file_plan.h"

#include <algorithm>
#include <cstring>
#include <future>

#include <fmt/ranges.h>

#include "error.h"

namespace tmkit {

namespace {

// Element converters: read one source element at `s`, write one destination element at `d`,
// return true when a finite value overflowed to infinity.
template <size_t N>
struct CopyBits {
  static constexpr size_t src_size = N, dst_size = N;
  bool operator()(const uint8_t* s, uint8_t* d) const { std::memcpy(d, s, N); return false; }
};

template <DType S>
inline float read_as_float(const uint8_t* s) {
  if constexpr (S == DType::F32) { float f; std::memcpy(&f, s, 4); return f; }
  uint16_t h;
  std::memcpy(&h, s, 2);
  if constexpr (S == DType::F16) return half_to_float(h);
  else return bf16_to_float(h);
}

template <DType S>
struct ToHalf {
  static constexpr size_t src_size = S == DType::F32 ? 4 : 2, dst_size = 2;
  bool operator()(const uint8_t* s, uint8_t* d) const {
    float f = read_as_float<S>(s);
    uint16_t h = float_to_half(f);
    std::memcpy(d, &h, 2);
    return half_is_inf(h) && std::abs(f) < 1.0f / 0.0f;
  }
};

template <DType S>
struct ToBF16 {
  static constexpr size_t src_size = S == DType::F32 ? 4 : 2, dst_size = 2;
  bool operator()(const uint8_t* s, uint8_t* d) const {
    uint16_t h = float_to_bf16(read_as_float<S>(s));
    std::memcpy(d, &h, 2);
    return false;
  }
};

template <DType S>
struct ToF32 {
  static constexpr size_t src_size = S == DType::F32 ? 4 : 2, dst_size = 4;
  bool operator()(const uint8_t* s, uint8_t* d) const {
    float f = read_as_float<S>(s);
    std::memcpy(d, &f, 4);
    return false;
  }
};

// Output rows [r0, r1) of the plan into `buf`.
template <class Cvt>
uint64_t fill_rows(const FilePlan& p, int64_t r0, int64_t r1, uint8_t* buf, Cvt cvt) {
  constexpr size_t SS = Cvt::src_size, DS = Cvt::dst_size;
  uint64_t overflow = 0;
  const int64_t R = int64_t(p.rows.size());
  if (!p.transpose) {
    for (int64_t r = r0; r < r1; ++r) {
      uint8_t* d = buf + size_t(r - r0) * size_t(p.cols) * DS;
      const RowRef& ref = p.rows[size_t(r)];
      int64_t valid = ref.src ? std::clamp<int64_t>(ref.src->cols() - p.col_offset, 0, p.cols) : 0;
      if (valid > 0) {
        const uint8_t* s = ref.src->data + (size_t(ref.row) * size_t(ref.src->cols()) + size_t(p.col_offset)) * SS;
        for (int64_t c = 0; c < valid; ++c) overflow += cvt(s + size_t(c) * SS, d + size_t(c) * DS);
      }
      std::memset(d + size_t(valid) * DS, 0, size_t(p.cols - valid) * DS);
    }
    return overflow;
  }
  // Transposed: output row i is source column col_offset + i across all plan rows. Each 64x64
  // tile is transposed into a small local buffer, then stored as whole contiguous tile rows:
  // storing element by element with the output's stride (often a multiple of 4 KiB) would keep
  // evicting the same few L1 sets.
  constexpr int64_t B = 64;
  alignas(64) uint8_t tile[B * B * DS];
  for (int64_t j0 = 0; j0 < R; j0 += B) {
    const int64_t j1 = std::min(R, j0 + B), bj = j1 - j0;
    for (int64_t i0 = r0; i0 < r1; i0 += B) {
      const int64_t i1 = std::min(r1, i0 + B);
      for (int64_t j = j0; j < j1; ++j) {
        const RowRef& ref = p.rows[size_t(j)];
        const int64_t src_cols = ref.src ? ref.src->cols() : 0;
        // Output rows [i0, valid) read the source; the rest (padding, null rows) are zeros.
        const int64_t valid = ref.src ? std::clamp<int64_t>(src_cols - p.col_offset, i0, i1) : i0;
        uint8_t* t = tile + size_t(j - j0) * DS;
        if (ref.src) {
          const uint8_t* s = ref.src->data + (size_t(ref.row) * size_t(src_cols) + size_t(p.col_offset + i0)) * SS;
          for (int64_t i = i0; i < valid; ++i, s += SS) overflow += cvt(s, t + size_t((i - i0) * bj) * DS);
        }
        for (int64_t i = valid; i < i1; ++i) std::memset(t + size_t((i - i0) * bj) * DS, 0, DS);
      }
      for (int64_t i = i0; i < i1; ++i)
        std::memcpy(buf + (size_t(i - r0) * size_t(R) + size_t(j0)) * DS, tile + size_t((i - i0) * bj) * DS, size_t(bj) * DS);
    }
  }
  return overflow;
}

template <class Cvt>
WriteStats run(const FilePlan& p, OutputFile& out, uint64_t chunk_bytes, Cvt cvt) {
  constexpr size_t DS = Cvt::dst_size;
  const int64_t out_rows = p.transpose ? p.cols : int64_t(p.rows.size());
  const int64_t out_cols = p.transpose ? int64_t(p.rows.size()) : p.cols;
  const uint64_t row_bytes = uint64_t(std::max<int64_t>(out_cols, 1)) * DS;
  const int64_t step = std::max<int64_t>(1, int64_t(chunk_bytes / row_bytes));
  const size_t buf_bytes = size_t(std::min<int64_t>(step, std::max<int64_t>(out_rows, 1))) * row_bytes;
  // Double buffering: chunk k is written by a helper thread while chunk k+1 is gathered.
  std::vector<uint8_t> bufs[2] = {std::vector<uint8_t>(buf_bytes), std::vector<uint8_t>(out_rows > step ? buf_bytes : 0)};
  std::future<void> pending;
  WriteStats st;
  int k = 0;
  for (int64_t r0 = 0; r0 < out_rows; r0 += step, k ^= 1) {
    const int64_t r1 = std::min(out_rows, r0 + step);
    uint8_t* buf = bufs[k].data();
    st.overflow += fill_rows(p, r0, r1, buf, cvt);
    const size_t n = size_t(r1 - r0) * size_t(row_bytes);
    if (pending.valid()) pending.get();
    pending = std::async(std::launch::async, [&out, buf, n] { out.write(buf, n); });
    st.bytes += n;
  }
  if (pending.valid()) pending.get();
  return st;
}

template <template <DType> class To>
WriteStats run_from(DType src, const FilePlan& p, OutputFile& out, uint64_t chunk) {
  switch (src) {
    case DType::F32: return run(p, out, chunk, To<DType::F32>{});
    case DType::F16: return run(p, out, chunk, To<DType::F16>{});
    case DType::BF16: return run(p, out, chunk, To<DType::BF16>{});
    default: fail("{}: cannot convert {} to a float type", p.file, dtype_name(src));
  }
}

}  // namespace

WriteStats write_file_plan(const FilePlan& p, DType dst, OutputFile& out, uint64_t chunk_bytes) {
  DType src = dst;
  bool have_src = false;
  for (const RowRef& r : p.rows) {
    if (!r.src) continue;
    if (have_src && r.src->dtype() != src)
      fail("{}: sources {} mix element types", p.file, fmt::join(p.sources, ", "));
    src = r.src->dtype();
    have_src = true;
  }
  if (src == dst) {
    switch (dtype_size(dst)) {
      case 1: return run(p, out, chunk_bytes, CopyBits<1>{});
      case 2: return run(p, out, chunk_bytes, CopyBits<2>{});
      default: return run(p, out, chunk_bytes, CopyBits<4>{});
    }
  }
  switch (dst) {
    case DType::F16: return run_from<ToHalf>(src, p, out, chunk_bytes);
    case DType::BF16: return run_from<ToBF16>(src, p, out, chunk_bytes);
    case DType::F32: return run_from<ToF32>(src, p, out, chunk_bytes);
    default: fail("{}: cannot convert {} to {}", p.file, dtype_name(src), dtype_name(dst));
  }
}

}  // namespace tmkit
