// rank_slice (runtime/tp_split.h): one tensor-parallel rank's weights, cut from merged weights as
// TurboMind splits them. Slices concatenate back to the merged weights exactly, equal the rank
// files `hf2tm --tp 2` writes (dense and int4), and impossible splits fail naming the reason.
#include <gtest/gtest.h>

#include <mutex>

#include "error.h"
#include "hf2tm.h"
#include "model_weights.h"
#include "rtn.h"
#include "tp_split.h"
#include "test_util.h"
#include "workspace_cache.h"

using namespace tmkit;

namespace {

fs::path workspace(const std::string& model, int64_t tp, bool int4 = false) {
  return test::cached_workspace(model, tp, int4);
}

// A rank file as floats [rows, cols] in the workspace's weight type.
Mat read_rank_file(const fs::path& ws, const std::string& name, int64_t rows, int64_t cols) {
  const MappedFile f(weights_dir(ws) / name);
  const DType t = load_tm_config(ws).weight_dtype();
  EXPECT_EQ(f.size(), uint64_t(rows * cols) * dtype_size(t)) << name;
  Mat m(rows, cols);
  for (int64_t i = 0; i < rows * cols; ++i) m.data()[i] = load_float(f.data(), t, size_t(i));
  return m;
}

template <typename E>
std::vector<E> read_raw(const fs::path& ws, const std::string& name) {
  const MappedFile f(weights_dir(ws) / name);
  std::vector<E> v(f.size() / sizeof(E));
  std::memcpy(v.data(), f.data(), v.size() * sizeof(E));
  return v;
}

Mat hcat(const std::vector<const Mat*>& parts) {
  Eigen::Index cols = 0;
  for (const Mat* p : parts) cols += p->cols();
  Mat out(parts[0]->rows(), cols);
  Eigen::Index c = 0;
  for (const Mat* p : parts) out.middleCols(c, p->cols()) = *p, c += p->cols();
  return out;
}

Mat vcat(const std::vector<const Mat*>& parts) {
  Eigen::Index rows = 0;
  for (const Mat* p : parts) rows += p->rows();
  Mat out(rows, parts[0]->cols());
  Eigen::Index r = 0;
  for (const Mat* p : parts) out.middleRows(r, p->rows()) = *p, r += p->rows();
  return out;
}

Vec vcat_vec(const std::vector<const Vec*>& parts) {
  Eigen::Index n = 0;
  for (const Vec* p : parts) n += p->size();
  Vec out(n);
  Eigen::Index i = 0;
  for (const Vec* p : parts) out.segment(i, p->size()) = *p, i += p->size();
  return out;
}

void expect_int4_eq(const Int4Linear& a, const Int4Linear& b, const std::string& what) {
  EXPECT_EQ(a.K, b.K) << what;
  EXPECT_EQ(a.N, b.N) << what;
  EXPECT_EQ(a.group, b.group) << what;
  EXPECT_TRUE(a.qweight == b.qweight) << what << " qweight";
  EXPECT_TRUE(a.scales == b.scales) << what << " scales";
  EXPECT_TRUE(a.zeros == b.zeros) << what << " zeros";
}

// The int4 linear of rank file `base` ("layers.0.attention.wo.1.") as stored.
Int4Linear read_int4(const fs::path& ws, const std::string& base, int64_t K, int64_t N) {
  Int4Linear q;
  q.K = K;
  q.N = N;
  q.qweight = read_raw<int32_t>(ws, base + "qweight");
  q.scales = read_raw<uint16_t>(ws, base + "scales");
  q.zeros = read_raw<uint16_t>(ws, base + "zeros");
  return q;
}

class RankSlice : public ::testing::TestWithParam<std::string> {};

}  // namespace

TEST_P(RankSlice, ConcatenatesBackExactly) {
  const ModelWeights w = load_workspace(workspace(GetParam(), 1));
  const int tp = 2;
  std::vector<ModelWeights> r;
  for (int rank = 0; rank < tp; ++rank) r.push_back(rank_slice(w, rank, tp));
  for (const ModelWeights& s : r) {
    EXPECT_EQ(s.cfg.head_num * tp, w.cfg.head_num);
    EXPECT_EQ(s.cfg.kv_head_num * tp, w.cfg.kv_head_num);
    EXPECT_EQ(s.cfg.tp, 1);
    for (size_t i = 0; i < s.cfg.inter_size.size(); ++i) EXPECT_EQ(s.cfg.inter_size[i] * tp, w.cfg.inter_size[i]);
    EXPECT_TRUE(s.embed == w.embed && s.output == w.output && s.norm == w.norm);  // replicated
  }
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const LayerWeights &l = w.layers[i], &a = r[0].layers[i], &b = r[1].layers[i];
    EXPECT_TRUE(hcat({&a.wq, &b.wq}) == l.wq) << i;
    EXPECT_TRUE(hcat({&a.wk, &b.wk}) == l.wk) << i;
    EXPECT_TRUE(hcat({&a.wv, &b.wv}) == l.wv) << i;
    EXPECT_TRUE(vcat({&a.wo, &b.wo}) == l.wo) << i;
    EXPECT_TRUE(hcat({&a.w1, &b.w1}) == l.w1) << i;
    EXPECT_TRUE(hcat({&a.w3, &b.w3}) == l.w3) << i;
    EXPECT_TRUE(vcat({&a.w2, &b.w2}) == l.w2) << i;
    if (l.bq.size()) {
      EXPECT_TRUE(vcat_vec({&a.bq, &b.bq}) == l.bq) << i;
      EXPECT_TRUE(vcat_vec({&a.bk, &b.bk}) == l.bk) << i;
      EXPECT_TRUE(vcat_vec({&a.bv, &b.bv}) == l.bv) << i;
    }
    EXPECT_TRUE(a.bo == l.bo && b.bo == l.bo) << i;  // replicated: added after the all-reduce
    EXPECT_TRUE(a.attn_norm == l.attn_norm && b.ffn_norm == l.ffn_norm) << i;
  }
}

// Slices of the tp=1 workspace (merged weights) are what hf2tm writes into each rank's files.
TEST_P(RankSlice, EqualsHf2TmRankFiles) {
  const std::string model = GetParam();
  const ModelWeights w = load_workspace(workspace(model, 1));
  const fs::path ws2 = workspace(model, 2);
  ASSERT_TRUE(load_tm_config(ws2).inter_size == w.cfg.inter_size);  // the same padding at tp 1 and 2
  const int64_t hid = w.cfg.hidden_units, D = w.cfg.size_per_head;
  for (int rank = 0; rank < 2; ++rank) {
    const ModelWeights s = rank_slice(w, rank, 2);
    const int64_t q = s.cfg.head_num * D, kv = s.cfg.kv_head_num * D;
    for (size_t i = 0; i < s.layers.size(); ++i) {
      const LayerWeights& l = s.layers[i];
      const std::string L = fmt::format("layers.{}.", i);
      const int64_t I = s.cfg.inter_size[i];
      EXPECT_TRUE(hcat({&l.wq, &l.wk, &l.wv}) == read_rank_file(ws2, rank_file(L + "attention.w_qkv", rank, "weight"), hid, q + 2 * kv))
          << L << rank;
      EXPECT_TRUE(l.wo == read_rank_file(ws2, rank_file(L + "attention.wo", rank, "weight"), q, hid)) << L << rank;
      EXPECT_TRUE(l.w1 == read_rank_file(ws2, rank_file(L + "feed_forward.w1", rank, "weight"), hid, I)) << L << rank;
      EXPECT_TRUE(l.w3 == read_rank_file(ws2, rank_file(L + "feed_forward.w3", rank, "weight"), hid, I)) << L << rank;
      EXPECT_TRUE(l.w2 == read_rank_file(ws2, rank_file(L + "feed_forward.w2", rank, "weight"), I, hid)) << L << rank;
      if (l.bq.size()) {
        const Mat b = read_rank_file(ws2, rank_file(L + "attention.w_qkv", rank, "bias"), 1, q + 2 * kv);
        EXPECT_TRUE(vcat_vec({&l.bq, &l.bk, &l.bv}) == b.row(0).transpose()) << L << rank;
      }
      if (l.bo.size()) {
        EXPECT_TRUE(l.bo == read_rank_file(ws2, rank_file(L + "attention.wo", rank, "bias"), 1, hid).row(0).transpose());
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Models, RankSlice, ::testing::Values("tiny-llama", "tiny-qwen2", "small-llama"),
                         [](const auto& info) {
                           std::string n = info.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

// int4 (RTN w4g128) small-llama: slices of the merged tp=1 workspace equal the packed rank files
// of the tp=2 one word for word (fused [q|k|v] and [w1|w3] columns, wo and w2 rows in whole
// groups), and the ranks' packed weights concatenate back to the merged ones.
TEST(RankSliceInt4, EqualsRankFilesAndConcatenatesBack) {
  const ModelWeights w = load_workspace(workspace("small-llama", 1, true));
  const fs::path ws2 = workspace("small-llama", 2, true);
  const int64_t hid = w.cfg.hidden_units, D = w.cfg.size_per_head, H = w.cfg.head_num, KV = w.cfg.kv_head_num;
  std::vector<ModelWeights> r = {rank_slice(w, 0, 2), rank_slice(w, 1, 2)};
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const std::string L = fmt::format("layers.{}.", i);
    const int64_t Ip = w.cfg.inter_size[i], I = Ip / 2, q = H / 2 * D, kv = KV / 2 * D;
    for (int rank = 0; rank < 2; ++rank) {
      const LayerWeights& l = r[size_t(rank)].layers[i];
      ASSERT_TRUE(l.qkv4 && l.wo4 && l.w13_4 && l.w2_4);
      const std::string at = L + std::to_string(rank);
      expect_int4_eq(*l.qkv4, read_int4(ws2, rank_file(L + "attention.w_qkv", rank, ""), hid, q + 2 * kv), at + " w_qkv");
      expect_int4_eq(*l.wo4, read_int4(ws2, rank_file(L + "attention.wo", rank, ""), q, hid), at + " wo");
      expect_int4_eq(*l.w2_4, read_int4(ws2, rank_file(L + "feed_forward.w2", rank, ""), I, hid), at + " w2");
      expect_int4_eq(concat_columns({{&*l.w13_4, 0, I}}), read_int4(ws2, rank_file(L + "feed_forward.w1", rank, ""), hid, I),
                     at + " w1");
      expect_int4_eq(concat_columns({{&*l.w13_4, I, I}}), read_int4(ws2, rank_file(L + "feed_forward.w3", rank, ""), hid, I),
                     at + " w3");
    }
    const LayerWeights &a = r[0].layers[i], &b = r[1].layers[i], &m = w.layers[i];
    expect_int4_eq(concat_columns({{&*a.qkv4, 0, q}, {&*b.qkv4, 0, q}, {&*a.qkv4, q, kv}, {&*b.qkv4, q, kv},
                                   {&*a.qkv4, q + kv, kv}, {&*b.qkv4, q + kv, kv}}),
                   *m.qkv4, L + " qkv4 merged");
    expect_int4_eq(concat_columns({{&*a.w13_4, 0, I}, {&*b.w13_4, 0, I}, {&*a.w13_4, I, I}, {&*b.w13_4, I, I}}), *m.w13_4,
                   L + " w13_4 merged");
    expect_int4_eq(concat_rows({&*a.wo4, &*b.wo4}), *m.wo4, L + " wo4 merged");
    expect_int4_eq(concat_rows({&*a.w2_4, &*b.w2_4}), *m.w2_4, L + " w2_4 merged");
  }
}

// Loaded for the GPU, an int4 workspace keeps its linears packed only (no dense fp32 copies), the
// same packed linears as a load for the CPU, and slices as that one does.
TEST(RankSliceInt4, LoadedForTheGpuKeepsOnlyThePackedLinears) {
  const fs::path ws = workspace("small-llama", 2, true);
  const ModelWeights cpu = load_workspace(ws), gpu = load_workspace(ws, LoadFor::kGpu);
  const ModelWeights cpu_r = rank_slice(cpu, 1, 2), gpu_r = rank_slice(gpu, 1, 2);
  ASSERT_EQ(gpu.layers.size(), cpu.layers.size());
  for (size_t i = 0; i < gpu.layers.size(); ++i) {
    const std::string at = fmt::format("layer {}", i);
    for (const ModelWeights* g : {&gpu, &gpu_r})
      for (const Mat* m : {&g->layers[i].wq, &g->layers[i].wo, &g->layers[i].w1, &g->layers[i].w2}) EXPECT_EQ(m->size(), 0) << at;
    EXPECT_GT(cpu.layers[i].wq.size(), 0) << at;
    for (auto [g, c] : {std::pair{&gpu, &cpu}, std::pair{&gpu_r, &cpu_r}}) {
      const LayerWeights &a = g->layers[i], &b = c->layers[i];
      ASSERT_TRUE(a.qkv4 && a.wo4 && a.w13_4 && a.w2_4) << at;
      expect_int4_eq(*a.qkv4, *b.qkv4, at + " qkv4");
      expect_int4_eq(*a.wo4, *b.wo4, at + " wo4");
      expect_int4_eq(*a.w13_4, *b.w13_4, at + " w13_4");
      expect_int4_eq(*a.w2_4, *b.w2_4, at + " w2_4");
      EXPECT_EQ(a.attn_norm, b.attn_norm) << at;
    }
  }
}

TEST(RankSliceBad, NamesTheReason) {
  const ModelWeights sl = load_workspace(workspace("small-llama", 1));   // 8 heads, 4 kv heads
  const ModelWeights tl = load_workspace(workspace("tiny-llama", 1));    // 4 heads, 2 kv heads, D 32
  auto err = [](const ModelWeights& w, int rank, int tp) { return test::error_of([&] { rank_slice(w, rank, tp); }); };
  EXPECT_NE(err(sl, 0, 3).find("tp 3 does not divide the 8 attention heads"), std::string::npos) << err(sl, 0, 3);
  EXPECT_NE(err(tl, 0, 4).find("tp 4 does not divide the 2 kv heads"), std::string::npos) << err(tl, 0, 4);
  EXPECT_NE(err(sl, 0, 0).find("at least 1"), std::string::npos);
  EXPECT_NE(err(sl, 2, 2).find("rank 2 is outside 0 .. 1"), std::string::npos) << err(sl, 2, 2);
  ModelWeights odd = tl;
  odd.cfg.inter_size[1] = 383;
  EXPECT_NE(err(odd, 0, 2).find("does not divide layer 1's inter_size 383"), std::string::npos) << err(odd, 0, 2);
  // int4 tiny-llama at tp 2: a rank's 64 rows of wo are half a group of 128.
  const ModelWeights t4 = load_workspace(workspace("tiny-llama", 1, true));
  EXPECT_NE(err(t4, 0, 2).find("64 rows of wo are not whole groups of 128"), std::string::npos) << err(t4, 0, 2);
  EXPECT_EQ(err(t4, 0, 1), "");  // tp 1 is the whole model
}
