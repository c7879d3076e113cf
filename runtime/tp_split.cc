#include "tp_split.h"

#include "error.h"

namespace tmkit {

namespace {

// Rows [begin, begin + count) of an int4 linear; both multiples of its group, so the rows carry
// their own scales and zeros (wo and w2 split on the input dim).
Int4Linear int4_rows(const Int4Linear& q, int64_t begin, int64_t count) {
  if (begin % q.group || count % q.group) fail("int4 rows [{}, {}) are not whole groups of {}", begin, begin + count, q.group);
  Int4Linear out;
  out.K = count;
  out.N = q.N;
  out.group = q.group;
  const auto words = q.qweight.begin() + begin * (q.N / 8);
  out.qweight.assign(words, words + count * (q.N / 8));
  const int64_t g0 = begin / q.group, groups = count / q.group;
  out.scales.assign(q.scales.begin() + g0 * q.N, q.scales.begin() + (g0 + groups) * q.N);
  out.zeros.assign(q.zeros.begin() + g0 * q.N, q.zeros.begin() + (g0 + groups) * q.N);
  return out;
}

}  // namespace

void check_tp_split(const TmConfig& c, int tp) {
  if (tp < 1) fail("tp {}: must be at least 1", tp);
  if (c.head_num % tp) fail("tp {} does not divide the {} attention heads", tp, c.head_num);
  if (c.kv_head_num % tp) fail("tp {} does not divide the {} kv heads", tp, c.kv_head_num);
  for (size_t i = 0; i < c.inter_size.size(); ++i)
    if (c.inter_size[i] % tp) fail("tp {} does not divide layer {}'s inter_size {}", tp, i, c.inter_size[i]);
  if (c.weight_type != "int4") return;
  // Packed int4: a rank's columns are whole 8-column words, its wo / w2 rows whole groups.
  const int64_t g = c.group_size, D = c.size_per_head;
  if (g <= 0) fail("int4 workspace without a group_size");
  for (int64_t cols : {c.head_num / tp * D, c.kv_head_num / tp * D})
    if (cols % 8) fail("int4 at tp {}: a rank's {} q or kv columns are not whole words of 8", tp, cols);
  if ((c.head_num / tp * D) % g)
    fail("int4 at tp {}: a rank's {} rows of wo are not whole groups of {}", tp, c.head_num / tp * D, g);
  for (size_t i = 0; i < c.inter_size.size(); ++i)
    if ((c.inter_size[i] / tp) % g || (c.inter_size[i] / tp) % 8)
      fail("int4 at tp {}: a rank's {} rows of layer {}'s w2 are not whole groups of {}", tp, c.inter_size[i] / tp, i, g);
}

ModelWeights rank_slice(const ModelWeights& w, int rank, int tp) {
  check_tp_split(w.cfg, tp);
  if (rank < 0 || rank >= tp) fail("rank {} is outside 0 .. {}", rank, tp - 1);
  const TmConfig& c = w.cfg;
  const int64_t H = c.head_num, KV = c.kv_head_num, D = c.size_per_head, r = rank;
  const int64_t q = H / tp * D, kv = KV / tp * D;  // a rank's q and k (or v) columns
  ModelWeights s;
  s.cfg = c;
  s.cfg.head_num = H / tp;
  s.cfg.kv_head_num = KV / tp;
  for (int64_t& i : s.cfg.inter_size) i /= tp;
  s.cfg.tp = 1;
  s.embed = w.embed;
  s.output = w.output;
  s.norm = w.norm;
  for (size_t li = 0; li < w.layers.size(); ++li) {
    const LayerWeights& l = w.layers[li];
    const int64_t Ip = c.inter_size[li], I = Ip / tp;
    LayerWeights o;
    o.attn_norm = l.attn_norm;
    o.ffn_norm = l.ffn_norm;
    if (l.wq.size()) {  // empty for int4 linears loaded for the GPU (LoadFor::kGpu)
      o.wq = l.wq.middleCols(r * q, q);
      o.wk = l.wk.middleCols(r * kv, kv);
      o.wv = l.wv.middleCols(r * kv, kv);
      o.wo = l.wo.middleRows(r * q, q);
      o.w1 = l.w1.middleCols(r * I, I);
      o.w3 = l.w3.middleCols(r * I, I);
      o.w2 = l.w2.middleRows(r * I, I);
    }
    if (l.bq.size()) {
      o.bq = l.bq.segment(r * q, q);
      o.bk = l.bk.segment(r * kv, kv);
      o.bv = l.bv.segment(r * kv, kv);
    }
    o.bo = l.bo;
    if (l.qkv4) {  // fused as load_workspace fuses them: [all q | all k | all v], [w1 | w3]
      o.qkv4 = concat_columns({{&*l.qkv4, r * q, q}, {&*l.qkv4, H * D + r * kv, kv}, {&*l.qkv4, (H + KV) * D + r * kv, kv}});
      o.w13_4 = concat_columns({{&*l.w13_4, r * I, I}, {&*l.w13_4, Ip + r * I, I}});
      o.wo4 = int4_rows(*l.wo4, r * q, q);
      o.w2_4 = int4_rows(*l.w2_4, r * I, I);
    }
    s.layers.push_back(std::move(o));
  }
  return s;
}

}  // namespace tmkit
