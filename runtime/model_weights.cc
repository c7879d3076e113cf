#include "model_weights.h"

#include <cstring>

#include "error.h"
#include "int4.h"
#include "parallel.h"

namespace tmkit {

namespace {

class WeightReader {
 public:
  WeightReader(const fs::path& ws, const TmConfig& c) : dir_(weights_dir(ws)), type_(c.weight_dtype()) {}

  // Reads `name` as [rows, cols] floats; the file must hold exactly rows*cols elements.
  Mat read(const std::string& name, int64_t rows, int64_t cols) const {
    const fs::path p = dir_ / name;
    if (!fs::exists(p)) fail("{}: missing tensor file", p.string());
    MappedFile f(p);
    const uint64_t expect = uint64_t(rows) * uint64_t(cols) * dtype_size(type_);
    if (f.size() != expect)
      fail("{}: {} bytes, expected {} ([{}, {}] {})", p.string(), f.size(), expect, rows, cols, dtype_name(type_));
    Mat m(rows, cols);
    float* dst = m.data();
    parallel_chunks(rows * cols, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dst[i] = load_float(f.data(), type_, uint64_t(i));
    });
    return m;
  }
  Vec read_vec(const std::string& name, int64_t n) const {
    Mat m = read(name, 1, n);
    return Eigen::Map<Vec>(m.data(), n);
  }
  bool has(const std::string& name) const { return fs::exists(dir_ / name); }

  // A linear [K, N] of rank file `base` ("layers.0.attention.wo.1."): `.weight`, or the int4
  // `.qweight/.scales/.zeros` of an int4 workspace, appended to `packed` and returned dequantized
  // (empty when not `dense`).
  Mat linear(const std::string& base, int64_t K, int64_t N, int64_t group, std::vector<Int4Linear>* packed,
             bool dense) const {
    if (group == 0) return read(base + "weight", K, N);
    if (K % group || N % 8) fail("{}: [{}, {}] does not fit int4 groups of {}", (dir_ / base).string(), K, N, group);
    Int4Linear q;
    q.K = K;
    q.N = N;
    q.group = group;
    q.qweight = read_raw<int32_t>(base + "qweight", uint64_t(K * N / 8));
    q.scales = read_raw<uint16_t>(base + "scales", uint64_t(K / group * N));
    q.zeros = read_raw<uint16_t>(base + "zeros", uint64_t(K / group * N));
    Mat m;
    if (dense) m = Eigen::Map<const Mat>(dequantize(q).data(), K, N);
    packed->push_back(std::move(q));
    return m;
  }

 private:
  template <typename E>
  std::vector<E> read_raw(const std::string& name, uint64_t count) const {
    const fs::path p = dir_ / name;
    if (!fs::exists(p)) fail("{}: missing tensor file", p.string());
    MappedFile f(p);
    if (f.size() != count * sizeof(E)) fail("{}: {} bytes, expected {}", p.string(), f.size(), count * sizeof(E));
    std::vector<E> v(count);
    std::memcpy(v.data(), f.data(), f.size());
    return v;
  }

 public:

 private:
  fs::path dir_;
  DType type_;
};

}  // namespace

ModelWeights load_workspace(const fs::path& ws, LoadFor use) {
  ModelWeights w;
  w.cfg = load_tm_config(ws);
  const TmConfig& c = w.cfg;
  // int4 workspaces: every decoder linear is kept packed, and dequantized for the CPU (spec §6.2);
  // side tensors are fp16.
  const int64_t group = c.weight_type == "int4" ? c.group_size : 0;
  if (c.weight_type == "int4" && c.group_size <= 0) fail("{}: int4 workspace without a group_size", ws.string());
  const WeightReader rd(ws, c);
  const int64_t tp = c.tp, hid = c.hidden_units, H = c.head_num, KV = c.kv_head_num, D = c.size_per_head;
  const int64_t Vp = c.vocab_padded(), Hr = H / tp, KVr = KV / tp;
  const bool int4 = group > 0, dense = !int4 || use == LoadFor::kCpu;

  w.embed.resize(Vp, hid);
  w.output.resize(Vp, hid);
  for (int64_t r = 0; r < tp; ++r) {
    w.embed.middleCols(r * hid / tp, hid / tp) = rd.read(rank_file("tok_embeddings", r, "weight"), Vp, hid / tp);
    w.output.middleRows(r * Vp / tp, Vp / tp) = rd.read(rank_file("output", r, "weight"), Vp / tp, hid);
  }
  w.norm = rd.read_vec("norm.weight", hid);

  for (int64_t i = 0; i < c.num_layer; ++i) {
    const std::string L = fmt::format("layers.{}.", i);
    const int64_t Ip = c.inter_size[size_t(i)], Ir = Ip / tp;
    LayerWeights l;
    l.attn_norm = rd.read_vec(L + "attention_norm.weight", hid);
    l.ffn_norm = rd.read_vec(L + "ffn_norm.weight", hid);
    if (dense) {
      l.wq.resize(hid, H * D);
      l.wk.resize(hid, KV * D);
      l.wv.resize(hid, KV * D);
      l.wo.resize(H * D, hid);
      l.w1.resize(hid, Ip);
      l.w3.resize(hid, Ip);
      l.w2.resize(Ip, hid);
    }
    if (c.attn_bias) {
      l.bq.resize(H * D);
      l.bk.resize(KV * D);
      l.bv.resize(KV * D);
    }
    const int64_t qkv_cols = (Hr + 2 * KVr) * D;
    std::vector<Int4Linear> qkv4, wo4, w1_4, w3_4, w2_4;  // per rank, int4 workspaces only
    for (int64_t r = 0; r < tp; ++r) {  // rank file r holds [q_r | k_r | v_r]
      Mat qkv = rd.linear(rank_file(L + "attention.w_qkv", r, ""), hid, qkv_cols, group, &qkv4, dense);
      if (dense) {
        l.wq.middleCols(r * Hr * D, Hr * D) = qkv.leftCols(Hr * D);
        l.wk.middleCols(r * KVr * D, KVr * D) = qkv.middleCols(Hr * D, KVr * D);
        l.wv.middleCols(r * KVr * D, KVr * D) = qkv.rightCols(KVr * D);
      }
      if (c.attn_bias) {
        Vec b = rd.read_vec(rank_file(L + "attention.w_qkv", r, "bias"), qkv_cols);
        l.bq.segment(r * Hr * D, Hr * D) = b.head(Hr * D);
        l.bk.segment(r * KVr * D, KVr * D) = b.segment(Hr * D, KVr * D);
        l.bv.segment(r * KVr * D, KVr * D) = b.tail(KVr * D);
      }
      const Mat wo = rd.linear(rank_file(L + "attention.wo", r, ""), Hr * D, hid, group, &wo4, dense);
      if (dense) l.wo.middleRows(r * Hr * D, Hr * D) = wo;
      // The wo bias is replicated: every rank has the same one, or none has any.
      const std::string bo = rank_file(L + "attention.wo", r, "bias");
      if (rd.has(bo) != rd.has(rank_file(L + "attention.wo", 0, "bias")))
        fail("{}: the wo bias exists on some ranks only", bo);
      if (rd.has(bo)) {
        Vec b = rd.read_vec(bo, hid);
        if (r == 0) l.bo = b;
        else if (b != l.bo) fail("{}: the replicated wo bias differs between rank 0 and rank {}", bo, r);
      }
      const Mat w1 = rd.linear(rank_file(L + "feed_forward.w1", r, ""), hid, Ir, group, &w1_4, dense);
      const Mat w3 = rd.linear(rank_file(L + "feed_forward.w3", r, ""), hid, Ir, group, &w3_4, dense);
      const Mat w2 = rd.linear(rank_file(L + "feed_forward.w2", r, ""), Ir, hid, group, &w2_4, dense);
      if (dense) {
        l.w1.middleCols(r * Ir, Ir) = w1;
        l.w3.middleCols(r * Ir, Ir) = w3;
        l.w2.middleRows(r * Ir, Ir) = w2;
      }
    }
    if (int4) {
      std::vector<Int4Columns> qkv_parts, w13_parts;
      for (int64_t part = 0; part < 3; ++part)  // all ranks' q, then all k, then all v
        for (int64_t r = 0; r < tp; ++r) {
          const int64_t begin = part == 0 ? 0 : part == 1 ? Hr * D : (Hr + KVr) * D;
          qkv_parts.push_back({&qkv4[size_t(r)], begin, part == 0 ? Hr * D : KVr * D});
        }
      for (const auto* w : {&w1_4, &w3_4})
        for (int64_t r = 0; r < tp; ++r) w13_parts.push_back({&(*w)[size_t(r)], 0, Ir});
      std::vector<const Int4Linear*> wo_parts, w2_parts;
      for (int64_t r = 0; r < tp; ++r) {
        wo_parts.push_back(&wo4[size_t(r)]);
        w2_parts.push_back(&w2_4[size_t(r)]);
      }
      l.qkv4 = concat_columns(qkv_parts);
      l.w13_4 = concat_columns(w13_parts);
      l.wo4 = concat_rows(wo_parts);
      l.w2_4 = concat_rows(w2_parts);
    }
    w.layers.push_back(std::move(l));
  }
  return w;
}

}  // namespace tmkit
