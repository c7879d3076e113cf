#include "tm_shard.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <set>

#include "error.h"
#include "kv_stats.h"
#include "turbomind.h"

namespace tmkit {

namespace {

// ---------------------------------------------------------------------------------------------
// Geometry: a rank file is a rectangle of a logical (unsplit) 2-D tensor. Along each axis the
// tensor is a sequence of parts (w_qkv's output columns: q, k, v), each split evenly across the
// ranks or held whole by every rank. A rank file holds its slice of every part, in part order.

struct Axis {
  std::vector<int64_t> src, dst;  // part widths, all ranks together, in the source / destination
  std::vector<int64_t> valid;     // per part: logical indices below are copied, the rest are zeros
  bool split = false;
  const char* name = "rows";      // for messages: "input channels", "vocab rows", ...
  int64_t unit = 1;               // elements per file index (int4: 8 columns a word, g rows a group)

  int64_t elements(int64_t tp, bool dst_side) const {
    int64_t n = 0;
    for (int64_t w : dst_side ? dst : src) n += split ? w / tp : w;
    return n;
  }
  int64_t indices(int64_t tp, bool dst_side) const { return elements(tp, dst_side) / unit; }
};

Axis whole(int64_t n, const char* name) { return {{n}, {n}, {n}, false, name}; }
Axis split(int64_t n, const char* name) { return {{n}, {n}, {n}, true, name}; }
// Padding that depends on tp (vocab rows, inter channels): `valid` leading entries carry data.
Axis padded(int64_t src, int64_t dst, int64_t valid, bool is_split, const char* name) {
  return {{src}, {dst}, {std::min({src, dst, valid})}, is_split, name};
}

// One tensor, as the files `prefix.{r}.suffix` of every rank (or the single file `prefix`).
struct Tensor {
  std::string prefix, suffix;
  bool ranked = true;
  bool replicated = false;  // every rank holds the same copy (the wo bias): checked in the source
  Axis rows, cols;
  int64_t elem = 2;  // bytes per file element

  std::string file(int64_t r) const { return ranked ? rank_file(prefix, r, suffix) : prefix; }
  uint64_t bytes(int64_t tp, bool dst_side) const {
    return uint64_t(rows.indices(tp, dst_side)) * uint64_t(cols.indices(tp, dst_side)) * uint64_t(elem);
  }
};

// Refuses a tp whose per-rank slices along `a` are unequal or not whole file units (int4 words of
// 8 output channels, groups of g input channels).
void check_axis(const Axis& a, const Tensor& t, int64_t tp, bool dst_side) {
  const std::string who = dst_side ? fmt::format("--tp {}", tp) : fmt::format("the source's tp {}", tp);
  for (int64_t w : dst_side ? a.dst : a.src) {
    if (a.split && w % tp) fail("{}: {} {} do not split into {} equal parts ({})", t.file(0), w, a.name, tp, who);
    const int64_t per_rank = a.split ? w / tp : w;
    if (per_rank % a.unit == 0) continue;
    if (a.unit == 8)
      fail("{}: {} leaves {} {} per rank, not a multiple of the 8 an int4 word packs", t.file(0), who, per_rank, a.name);
    fail("{}: {} leaves {} {} per rank, which cuts the int4 quantization groups of {} (a rank needs whole groups)",
         t.file(0), who, per_rank, a.name, a.unit);
  }
}

// A run of file indices along one axis of a destination rank file: `count` indices from source
// rank `rank` starting at `begin` there; kOtherAxis: the rank the other axis names (or any rank).
struct Run {
  int64_t rank, begin, count;
};
constexpr int64_t kZeros = -2, kOtherAxis = -1;

std::vector<Run> runs_of(const Axis& a, int64_t ts, int64_t tn, int64_t r, const std::string& file) {
  std::vector<Run> runs;
  int64_t src_offset = 0;  // where the current part starts inside a source rank file
  for (size_t p = 0; p < a.src.size(); ++p) {
    const int64_t ws = a.split ? a.src[p] / ts : a.src[p], wd = a.split ? a.dst[p] / tn : a.dst[p];
    const int64_t first = a.split ? r * wd : 0, end = first + wd, valid = a.valid[p];
    for (int64_t l = first; l < end;) {
      if (l >= valid) {
        runs.push_back({kZeros, 0, end - l});
        break;
      }
      const int64_t s = a.split ? l / ws : 0, n = std::min({end, valid, (s + 1) * ws}) - l;
      runs.push_back({a.split ? s : kOtherAxis, src_offset + l - s * ws, n});
      l += n;
    }
    src_offset += ws;
  }
  for (Run& run : runs) {
    if (run.begin % a.unit || run.count % a.unit)  // check_axis makes this unreachable
      fail("{}: a slice of {} at {} is not aligned to {}", file, a.name, run.begin, a.unit);
    run.begin /= a.unit;
    run.count /= a.unit;
  }
  return runs;
}

MappedFile map_exact(const fs::path& p, uint64_t bytes, const std::string& what) {
  if (!fs::exists(fs::symlink_status(p))) fail("{}: missing tensor file ({})", p.string(), what);
  MappedFile f(p);
  if (f.size() != bytes) fail("{}: {} bytes, expected {} ({})", p.string(), f.size(), bytes, what);
  return f;
}

std::string shape_text(const Tensor& t, int64_t tp, bool dst_side) {
  return fmt::format("[{}, {}] x {} B at tp {}", t.rows.indices(tp, dst_side), t.cols.indices(tp, dst_side), t.elem, tp);
}

// The source rank files of one tensor, mapped on first use (sizes checked) and unmapped with it.
class SourceRanks {
 public:
  SourceRanks(const Tensor& t, const fs::path& dir, int64_t ts) : t_(t), dir_(dir), ts_(ts), maps_(size_t(ts)) {}
  const uint8_t* data(int64_t r) {
    auto& m = maps_[size_t(r)];
    if (!m) m = map_exact(dir_ / t_.file(r), t_.bytes(ts_, false), shape_text(t_, ts_, false));
    return m->data();
  }

 private:
  const Tensor& t_;
  fs::path dir_;
  int64_t ts_;
  std::vector<std::optional<MappedFile>> maps_;
};

// Writes destination rank r of `t`, gathered row by row from the source ranks.
uint64_t write_rank(const Tensor& t, SourceRanks& src, int64_t ts, int64_t tn, int64_t r, const fs::path& out) {
  const std::vector<Run> row_runs = runs_of(t.rows, ts, tn, r, t.file(r)), col_runs = runs_of(t.cols, ts, tn, r, t.file(r));
  const size_t elem = size_t(t.elem), src_cols = size_t(t.cols.indices(ts, false));
  const size_t row_bytes = size_t(t.cols.indices(tn, true)) * elem;
  const size_t chunk_rows = std::max<size_t>(1, (8u << 20) / std::max<size_t>(row_bytes, 1));
  std::vector<uint8_t> buf(chunk_rows * row_bytes);
  OutputFile f(out);
  size_t filled = 0;
  uint64_t written = 0;
  for (const Run& rr : row_runs)
    for (int64_t i = 0; i < rr.count; ++i) {
      uint8_t* d = buf.data() + filled * row_bytes;
      for (const Run& cr : col_runs) {
        const size_t n = size_t(cr.count) * elem;
        if (rr.rank == kZeros || cr.rank == kZeros) {
          std::memset(d, 0, n);
        } else {
          const int64_t rank = rr.rank >= 0 ? rr.rank : std::max<int64_t>(cr.rank, 0);
          std::memcpy(d, src.data(rank) + (size_t(rr.begin + i) * src_cols + size_t(cr.begin)) * elem, n);
        }
        d += n;
      }
      if (++filled == chunk_rows) {
        f.write(buf.data(), filled * row_bytes);
        written += filled * row_bytes;
        filled = 0;
      }
    }
  f.write(buf.data(), filled * row_bytes);
  f.close();
  return written + filled * row_bytes;
}

// The wo bias is one vector copied to every rank: ranks that disagree are not a workspace hf2tm
// (or lmdeploy) wrote, and which copy to keep would be a guess.
void check_replicated(const Tensor& t, SourceRanks& src, const fs::path& dir, int64_t ts) {
  for (int64_t r = 1; r < ts; ++r)
    if (std::memcmp(src.data(r), src.data(0), t.bytes(ts, false)) != 0)
      fail("{}: the replicated tensor differs from rank 0's {}", (dir / t.file(r)).string(), t.file(0));
}

// ---------------------------------------------------------------------------------------------
// The workspace: which tensors, their axes, and the tp-dependent padding.

struct Shape {
  const TmConfig& c;
  int64_t ts, tn;
  std::vector<int64_t> inter_dst;  // per layer
  bool int4() const { return c.weight_type == "int4"; }
  int64_t group() const { return std::max<int64_t>(1, c.group_size); }
};

// A linear stored [in, out]: one fp file, or int4 qweight [K, N/8] int32 and scales / zeros [K/g, N] fp16.
void add_linear(std::vector<Tensor>& out, const Shape& s, const std::string& prefix, Axis in, Axis outs) {
  in.name = "input channels";
  outs.name = "output channels";
  if (!s.int4()) {
    out.push_back({prefix, "weight", true, false, in, outs, 2});
    return;
  }
  Axis words = outs, groups = in;
  words.unit = 8;
  groups.unit = s.group();
  out.push_back({prefix, "qweight", true, false, in, words, 4});
  out.push_back({prefix, "scales", true, false, groups, outs, 2});
  out.push_back({prefix, "zeros", true, false, groups, outs, 2});
}

std::vector<Tensor> plan_tensors(const Shape& s, const fs::path& sw) {
  const TmConfig& c = s.c;
  const int64_t hid = c.hidden_units, V = c.vocab_size, HD = c.head_num * c.size_per_head, KVD = c.kv_head_num * c.size_per_head;
  const int64_t vs = TmConfig::pad_to(V, s.ts), vn = TmConfig::pad_to(V, s.tn);
  auto norm = [&](const std::string& file) { return Tensor{file, "", false, false, whole(1, "rows"), whole(hid, "columns"), 2}; };
  std::vector<Tensor> out;
  out.push_back({"tok_embeddings", "weight", true, false, padded(vs, vn, V, false, "vocab rows"), split(hid, "hidden columns"), 2});
  for (int64_t i = 0; i < c.num_layer; ++i) {
    const std::string L = fmt::format("layers.{}.", i);
    const int64_t is = c.inter_size[size_t(i)], in = s.inter_dst[size_t(i)];
    out.push_back(norm(L + "attention_norm.weight"));
    Axis qkv{{HD, KVD, KVD}, {HD, KVD, KVD}, {HD, KVD, KVD}, true, "output channels"};
    add_linear(out, s, L + "attention.w_qkv", whole(hid, ""), qkv);
    if (c.attn_bias) out.push_back({L + "attention.w_qkv", "bias", true, false, whole(1, "rows"), qkv, 2});
    add_linear(out, s, L + "attention.wo", split(HD, ""), whole(hid, ""));
    // Optional (Llama attention_bias, or zeros beside Qwen2's q/k/v biases): present on rank 0 or nowhere.
    if (fs::exists(sw / rank_file(L + "attention.wo", 0, "bias")))
      out.push_back({L + "attention.wo", "bias", true, true, whole(1, "rows"), whole(hid, "columns"), 2});
    out.push_back(norm(L + "ffn_norm.weight"));
    add_linear(out, s, L + "feed_forward.w1", whole(hid, ""), padded(is, in, in, true, ""));
    add_linear(out, s, L + "feed_forward.w3", whole(hid, ""), padded(is, in, in, true, ""));
    add_linear(out, s, L + "feed_forward.w2", padded(is, in, in, true, ""), whole(hid, ""));
  }
  out.push_back(norm("norm.weight"));
  out.push_back({"output", "weight", true, false, padded(vs, vn, V, true, "vocab rows"), whole(hid, "columns"), 2});
  return out;
}

// Whether 4-bit nibbles [n0, n1) of rows [row0, row1) are all zero, in a file of `row_bytes`-byte
// rows (nibble n = bits 4(n%2) of byte n/2: an fp16 element is 4 nibbles, an int4 code 1).
bool zero_nibbles(const MappedFile& f, size_t row_bytes, int64_t row0, int64_t row1, int64_t n0, int64_t n1) {
  for (int64_t row = row0; row < row1; ++row) {
    const uint8_t* p = f.data() + size_t(row) * row_bytes;
    for (int64_t n = n0; n < n1; ++n)
      if ((p[n / 2] >> (4 * (n % 2))) & 0xf) return false;
  }
  return true;
}

// The source files of one layer's MLP seen per inter channel: w1 and w3 hold it as a column, w2
// as a row (int4: qweight, scales and zeros of each).
struct InterFiles {
  std::vector<Tensor> by_column, by_row;
};

// Inter channel `ch` is padding when it is zero everywhere: its w1 and w3 columns and its w2 row
// (int4: codes, scales and zeros, and w2's scales and zeros of the channel's whole group, as
// hf2tm pads whole groups with zeros).
bool inter_channel_is_zero(const Shape& s, const fs::path& sw, const InterFiles& files, int64_t ch,
                           std::map<std::string, MappedFile>& maps) {
  const int64_t per_rank = files.by_row.front().rows.src.front() / s.ts, rank = ch / per_rank, local = ch % per_rank;
  auto mapped = [&](const Tensor& t) -> const MappedFile& {
    const std::string name = t.file(rank);
    auto it = maps.find(name);
    if (it == maps.end()) it = maps.emplace(name, map_exact(sw / name, t.bytes(s.ts, false), shape_text(t, s.ts, false))).first;
    return it->second;
  };
  for (const Tensor& t : files.by_column) {
    const int64_t rows = t.rows.indices(s.ts, false), nibbles = t.elem == 4 ? 1 : 4;  // qweight: a nibble a column
    const size_t row_bytes = size_t(t.cols.indices(s.ts, false) * t.elem);
    if (!zero_nibbles(mapped(t), row_bytes, 0, rows, local * nibbles, (local + 1) * nibbles)) return false;
  }
  for (const Tensor& t : files.by_row) {
    const int64_t row = local / t.rows.unit;  // scales / zeros: the channel's group
    const size_t row_bytes = size_t(t.cols.indices(s.ts, false) * t.elem);
    if (!zero_nibbles(mapped(t), row_bytes, row, row + 1, 0, int64_t(row_bytes) * 2)) return false;
  }
  return true;
}

// The destination inter_size of each layer, as hf2tm computes it from the model's intermediate
// size I. The workspace records only I padded for the source tp (I plus fewer than g' * ts zero
// channels), so I is taken as the source size less its trailing all-zero channels in that range:
// exact for hf2tm's padding; a real channel that is zero in w1, w3 and w2 alike computes nothing.
std::vector<int64_t> destination_inter(const Shape& s, const fs::path& sw) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < s.c.num_layer; ++i) {
    const int64_t is = s.c.inter_size[size_t(i)], g = s.group(), limit = std::min(g * s.ts - 1, is - 1);
    if (is % s.ts || (s.int4() && (is / s.ts) % g))
      fail("{}: model_config.inter_size[{}] = {} does not split into tp {} ranks of whole groups of {}",
           (sw / "config.yaml").string(), i, is, s.ts, g);
    const std::string L = fmt::format("layers.{}.feed_forward.", i);
    InterFiles files;  // only their source side is read
    add_linear(files.by_column, s, L + "w1", whole(s.c.hidden_units, ""), split(is, ""));
    add_linear(files.by_column, s, L + "w3", whole(s.c.hidden_units, ""), split(is, ""));
    add_linear(files.by_row, s, L + "w2", split(is, ""), whole(s.c.hidden_units, ""));
    for (const auto* list : {&files.by_column, &files.by_row})  // whole units: the scan below stays in bounds
      for (const Tensor& t : *list) {
        check_axis(t.rows, t, s.ts, false);
        check_axis(t.cols, t, s.ts, false);
      }
    std::map<std::string, MappedFile> maps;
    int64_t zeros = 0;
    while (zeros < limit && inter_channel_is_zero(s, sw, files, is - 1 - zeros, maps)) ++zeros;
    out.push_back(TmConfig::pad_inter(is - zeros, g, s.tn));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// past_kv_scale (spec §7.1): per layer and rank, fp32 [k_scale, k_zp, v_scale, v_zp] over the
// rank's kv heads, scale = (max - min) / (2^bits - 1), zp = (max + min) / 2. A destination rank
// within one source rank keeps that rank's values (the range covers its heads; the legacy files
// hold no per-head statistics); ranks that merge take the union of their ranges.

struct KvScale {
  float v[4];
};

KvScale read_kv_scale(const fs::path& p) {
  const MappedFile f = map_exact(p, 16, "fp32 [k_scale, k_zp, v_scale, v_zp]");
  KvScale k;
  std::memcpy(k.v, f.data(), 16);
  for (int j = 0; j < 4; ++j)
    if (!std::isfinite(k.v[j]) || ((j == 0 || j == 2) && k.v[j] < 0))
      fail("{}: value {} = {} is not a valid {}", p.string(), j, k.v[j], j % 2 ? "zero point" : "scale");
  return k;
}

KvScale merge_kv_scales(const std::vector<KvScale>& parts, int bits) {
  KvScale out = parts[0];
  bool same = true;
  for (const auto& p : parts) same = same && std::memcmp(p.v, parts[0].v, 16) == 0;
  if (same) return out;  // bit-exact, so that a split followed by a merge gives the original back
  const double levels = std::ldexp(1.0, bits) - 1;
  for (int kv = 0; kv < 2; ++kv) {
    double lo = INFINITY, hi = -INFINITY;
    for (const auto& p : parts) {
      const double half = double(p.v[2 * kv]) * levels / 2;
      lo = std::min(lo, double(p.v[2 * kv + 1]) - half);
      hi = std::max(hi, double(p.v[2 * kv + 1]) + half);
    }
    out.v[2 * kv] = float((hi - lo) / levels);
    out.v[2 * kv + 1] = float((hi + lo) / 2);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Checks on the whole source before anything is written.

// config.yaml is rewritten from its parsed values: a line that would not come back (a key or a
// spelling this tool does not carry) would silently change the workspace, so it is refused.
void check_config_carries_over(const std::string& text, const TmConfig& c, const fs::path& where) {
  const std::string again = format_config_yaml(c);
  if (again == text) return;
  size_t a = 0, b = 0, line = 1;
  for (;; ++line) {
    const size_t ea = text.find('\n', a), eb = again.find('\n', b);
    const std::string la = text.substr(a, ea - a), lb = again.substr(b, eb - b);
    if (la != lb || ea == std::string::npos || eb == std::string::npos)
      fail("{}: line {} '{}' would not carry over (tm-shard rewrites config.yaml as hf2tm writes it, which "
           "has '{}' there)", where.string(), line, la, lb);
    a = ea + 1;
    b = eb + 1;
  }
}

void check_tp(const TmConfig& c, int64_t tn) {
  if (tn < 1 || tn > 1024) fail("--tp {}: must be in [1, 1024]", tn);
  const std::pair<const char*, int64_t> dims[] = {
      {"head_num (attention heads)", c.head_num}, {"kv_head_num (kv heads)", c.kv_head_num}, {"hidden_units", c.hidden_units}};
  for (const auto& [name, n] : dims)
    if (n % tn) fail("--tp {}: {} = {} is not divisible by it", tn, name, n);
}

// Everything in the source must be something tm-shard re-splits or copies: a file it does not
// know would otherwise be dropped from the result without a word.
void check_known_entries(const fs::path& dir, const std::set<std::string>& known) {
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (!known.count(name))
      fail("{}: not part of the TurboMind workspace layout tm-shard re-splits (remove it, or convert again)",
           e.path().string());
  }
}

// The destination is neither the source, nor inside it, nor contains it (--force would remove
// what is being read).
void check_apart(const fs::path& dst, const fs::path& src) {
  check_not_inside(dst, src, "--dst-path");
  const fs::path d = fs::weakly_canonical(dst), s = fs::weakly_canonical(src);
  if (std::mismatch(s.begin(), s.end(), d.begin(), d.end()).first == s.end())
    fail("--dst-path {}: is inside the source workspace {}", dst.string(), src.string());
}

void copy_tokenizer(const fs::path& src_ws, const fs::path& dst_ws, std::vector<std::string>& files) {
  const fs::path from = tokenizer_dir(src_ws), to = tokenizer_dir(dst_ws);
  if (!fs::exists(from)) return;
  std::error_code ec;
  fs::copy(from, to, fs::copy_options::recursive, ec);
  if (ec) fail("{}: cannot copy to {}: {}", from.string(), to.string(), ec.message());
  std::vector<std::string> names;
  for (const auto& e : fs::recursive_directory_iterator(to))
    if (e.is_regular_file()) names.push_back("triton_models/tokenizer/" + fs::relative(e.path(), to).generic_string());
  std::sort(names.begin(), names.end());
  files.insert(files.end(), names.begin(), names.end());
}

// Every source file present with its exact size, nothing unknown beside them, every split whole
// in the source and the destination. Returns whether past_kv_scale files are present (alone: a
// kv-calibrate'd workspace's, listed in its config, are rewritten from its statistics instead).
bool check_source(const Shape& shape, const std::vector<Tensor>& tensors, const fs::path& src) {
  const fs::path sw = weights_dir(src);
  std::set<std::string> known = {"config.yaml"};
  for (const Tensor& t : tensors) {
    for (const Axis* a : {&t.rows, &t.cols}) {
      check_axis(*a, t, shape.ts, false);
      check_axis(*a, t, shape.tn, true);
    }
    for (int64_t r = 0; r < (t.ranked ? shape.ts : 1); ++r) {
      const fs::path p = sw / t.file(r);
      std::error_code ec;
      const uint64_t size = fs::file_size(p, ec), want = t.bytes(shape.ts, false);
      if (ec) fail("{}: missing tensor file ({})", p.string(), shape_text(t, shape.ts, false));
      if (size != want) fail("{}: {} bytes, expected {} ({})", p.string(), size, want, shape_text(t, shape.ts, false));
      known.insert(t.file(r));
    }
  }
  if (shape.c.kv_calib_bits) {  // kv-calibrate's files: all of them, sizes checked where they are read
    TmConfig src_ranks = shape.c;
    src_ranks.tp = shape.ts;
    for (const std::string& f : kv_calibration_files(src_ranks)) {
      if (!fs::exists(sw / f)) fail("{}: missing (config.yaml lists a KV calibration)", (sw / f).string());
      known.insert(f);
    }
  }
  const bool kv_scales = !shape.c.kv_calib_bits && fs::exists(sw / past_kv_scale_file(0, 0));
  for (int64_t i = 0; kv_scales && i < shape.c.num_layer; ++i)
    for (int64_t r = 0; r < shape.ts; ++r) {
      read_kv_scale(sw / past_kv_scale_file(i, r));
      known.insert(past_kv_scale_file(i, r));
    }
  check_known_entries(sw, known);
  check_known_entries(src, {"triton_models"});
  check_known_entries(src / "triton_models", {"weights", "tokenizer"});
  return kv_scales;
}

using FileDone = std::function<void(const std::string& name, uint64_t bytes)>;

void write_kv_scales(const Shape& shape, const fs::path& sw, const fs::path& dw, int bits, const FileDone& done) {
  const int64_t ks = shape.c.kv_head_num / shape.ts, kd = shape.c.kv_head_num / shape.tn;
  for (int64_t i = 0; i < shape.c.num_layer; ++i)
    for (int64_t r = 0; r < shape.tn; ++r) {
      std::vector<KvScale> parts;  // the source ranks holding this rank's kv heads
      for (int64_t s = r * kd / ks; s <= ((r + 1) * kd - 1) / ks; ++s) parts.push_back(read_kv_scale(sw / past_kv_scale_file(i, s)));
      const KvScale merged = merge_kv_scales(parts, bits);
      write_file(dw / past_kv_scale_file(i, r), merged.v, 16);
      done(past_kv_scale_file(i, r), 16);
    }
}

}  // namespace

TmShardReport reshard_workspace(const TmShardOptions& opt, const TmShardProgress& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  if (opt.dst.empty()) fail("--dst-path is empty");
  if (!fs::is_directory(opt.src)) fail("{}: not a directory (expected a TurboMind workspace)", opt.src.string());
  check_apart(opt.dst, opt.src);
  if (opt.kv_bits < 1 || opt.kv_bits > 16) fail("--kv-bits {}: must be in [1, 16]", opt.kv_bits);
  const fs::path sw = weights_dir(opt.src);
  const TmConfig c = load_tm_config(opt.src);
  check_config_carries_over(read_text_file(sw / "config.yaml", 1 << 20), c, sw / "config.yaml");
  check_tp(c, opt.tp);
  if (c.weight_type == "int4" && c.group_size <= 0)
    fail("{}: an int4 workspace with group_size {}", (sw / "config.yaml").string(), c.group_size);

  Shape shape{c, c.tp, opt.tp, {}};
  shape.inter_dst = destination_inter(shape, sw);
  const std::vector<Tensor> tensors = plan_tensors(shape, sw);
  const bool kv_scales = check_source(shape, tensors, opt.src);

  TmShardReport rep;
  rep.tp_from = shape.ts;
  rep.tp = shape.tn;
  rep.weight_type = c.weight_type;
  rep.inter_size = shape.inter_dst;
  rep.kv_scales = kv_scales;
  uint64_t total_bytes = kv_scales ? 16 * uint64_t(c.num_layer * shape.tn) : 0;
  int64_t total_files = kv_scales ? c.num_layer * shape.tn : 0;
  for (const Tensor& t : tensors) {
    total_bytes += t.bytes(shape.tn, true) * uint64_t(t.ranked ? shape.tn : 1);
    total_files += t.ranked ? shape.tn : 1;
  }
  const FileDone done = [&](const std::string& name, uint64_t bytes) {
    rep.tensors += 1;
    rep.bytes += bytes;
    rep.files.push_back("triton_models/weights/" + name);
    if (progress) progress(rep.tensors, total_files, rep.bytes, total_bytes, name);
  };

  AtomicOutputDir out(opt.dst, opt.force);
  const fs::path dw = weights_dir(out.tmp());
  fs::create_directories(dw);
  for (const Tensor& t : tensors) {
    SourceRanks src(t, sw, shape.ts);  // unmapped after this tensor: memory stays near one tensor
    if (t.replicated) check_replicated(t, src, sw, shape.ts);
    for (int64_t r = 0; r < (t.ranked ? shape.tn : 1); ++r) {
      check_interrupted();
      done(t.file(r), write_rank(t, src, shape.ts, shape.tn, r, dw / t.file(r)));
    }
  }
  if (kv_scales) write_kv_scales(shape, sw, dw, opt.kv_bits, done);
  TmConfig dst_config = c;
  dst_config.tp = shape.tn;
  dst_config.inter_size = shape.inter_dst;
  if (c.kv_calib_bits) {  // the statistics carry over; what derives from them is made for the new tp
    fs::copy_file(sw / kKvStatsFile, dw / kKvStatsFile);
    write_kv_derived(dw, dst_config, read_kv_stats(sw / kKvStatsFile, c), int(c.kv_calib_bits));
    for (const std::string& f : kv_calibration_files(dst_config)) rep.files.push_back("triton_models/weights/" + f);
    rep.kv_scales = true;
  }
  write_file(dw / "config.yaml", format_config_yaml(dst_config));
  rep.files.push_back("triton_models/weights/config.yaml");
  copy_tokenizer(opt.src, out.tmp(), rep.files);
  out.commit();
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace tmkit
