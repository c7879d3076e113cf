#include "awq_layer.h"

#include <cmath>

#include "error.h"

namespace tmkit {

namespace {

Mat read_mat(const Checkpoint& ck, const std::string& name, int64_t rows, int64_t cols) {
  const TensorView v = ck.get(name);
  if (v.info->numel() != rows * cols)
    fail("{}: tensor '{}' has {} values, expected [{}, {}] from config.json", v.file, name, v.info->numel(), rows, cols);
  Mat m(rows, cols);
  for (int64_t i = 0; i < rows * cols; ++i) m.data()[i] = load_float(v.data, v.dtype(), size_t(i));
  return m;
}

Vec read_vec(const Checkpoint& ck, const std::string& name, int64_t n) {
  const Mat m = read_mat(ck, name, n, 1);
  return Eigen::Map<const Vec>(m.data(), n);
}

void store(AwqResult& r, const std::string& name, const Mat& m) { r.tensors[name].assign(m.data(), m.data() + m.size()); }
void store(AwqResult& r, const std::string& name, const Vec& v) { r.tensors[name].assign(v.data(), v.data() + v.size()); }

}  // namespace

AwqShape awq_shape(const fs::path& hf_dir, size_t tokens, int64_t blocks, int64_t seqlen, const AwqOptions& opt) {
  AwqShape c;
  c.hf = load_hf_config(hf_dir);
  const HfConfig& hf = c.hf;
  if (hf.arch == Arch::InternLM2 || hf.awq.present)
    fail("{}: the AWQ search takes fp16/bf16/fp32 Llama, Mistral or Qwen2 checkpoints", (hf_dir / "config.json").string());
  if (int64_t(tokens) != blocks * seqlen) fail("awq: {} calibration tokens for {} blocks of {}", tokens, blocks, seqlen);
  c.hid = hf.hidden;
  c.H = hf.heads;
  c.KV = hf.kv_heads;
  c.D = hf.head_dim;
  c.I = hf.inter;
  c.blocks = blocks;
  c.seqlen = seqlen;
  c.T = blocks * seqlen;
  for (auto [k, name, quant] : {std::tuple{c.hid, "self_attn.q_proj", &c.quant_hidden}, {c.H * c.D, "self_attn.o_proj", &c.quant_o},
                                {c.I, "mlp.down_proj", &c.quant_down}}) {
    *quant = k % opt.group == 0;
    if (!*quant && !opt.skip_indivisible)
      fail("{}: model.layers.*.{}.weight has {} input channels, not a multiple of the group size {} "
           "(--skip-indivisible keeps such linears fp16)", hf_dir.string(), name, k, opt.group);
  }
  c.mha = c.KV * c.D == c.hid && c.H * c.D == c.hid;
  c.scale = 1.0f / std::sqrt(float(c.D));
  c.rope = rope_table(hf.rope, c.D, hf.max_position_embeddings, seqlen);
  c.eps = hf.norm_eps;
  return c;
}

Mat awq_embed(const Checkpoint& ck, const AwqShape& c, const std::vector<int32_t>& tokens) {
  const Mat embed = read_mat(ck, "model.embed_tokens.weight", c.hf.vocab, c.hid);
  Mat x(c.T, c.hid);
  for (int64_t t = 0; t < c.T; ++t) {
    if (tokens[size_t(t)] < 0 || tokens[size_t(t)] >= c.hf.vocab)
      fail("awq: calibration token {} outside the vocabulary", tokens[size_t(t)]);
    x.row(t) = embed.row(tokens[size_t(t)]);
  }
  return x;
}

LayerW awq_read_layer(const Checkpoint& ck, const AwqShape& c, int64_t i) {
  const std::string p = fmt::format("model.layers.{}.", i), a = p + "self_attn.", m = p + "mlp.";
  const int64_t hid = c.hid, H = c.H, KV = c.KV, D = c.D, I = c.I;
  LayerW w;
  w.q = read_mat(ck, a + "q_proj.weight", H * D, hid);
  w.k = read_mat(ck, a + "k_proj.weight", KV * D, hid);
  w.v = read_mat(ck, a + "v_proj.weight", KV * D, hid);
  w.o = read_mat(ck, a + "o_proj.weight", hid, H * D);
  w.gate = read_mat(ck, m + "gate_proj.weight", I, hid);
  w.up = read_mat(ck, m + "up_proj.weight", I, hid);
  w.down = read_mat(ck, m + "down_proj.weight", hid, I);
  if (c.hf.attn_bias) {
    w.bq = read_vec(ck, a + "q_proj.bias", H * D);
    w.bk = read_vec(ck, a + "k_proj.bias", KV * D);
    w.bv = read_vec(ck, a + "v_proj.bias", KV * D);
  }
  if (ck.has(a + "o_proj.bias")) w.bo = read_vec(ck, a + "o_proj.bias", hid);
  w.attn_norm = read_vec(ck, p + "input_layernorm.weight", hid);
  w.ffn_norm = read_vec(ck, p + "post_attention_layernorm.weight", hid);
  for (auto [name, mat] : {std::pair{"q_proj", &w.q}, {"k_proj", &w.k}, {"v_proj", &w.v}, {"o_proj", &w.o},
                           {"gate_proj", &w.gate}, {"up_proj", &w.up}, {"down_proj", &w.down}})
    if (!mat->allFinite()) fail("layer {}: {}.weight holds NaN or Inf", i, name);
  return w;
}

std::vector<Vec> awq_scale_candidates(const Vec& x_mean, const std::vector<const Mat*>& ws, const AwqOptions& opt) {
  const int64_t C = x_mean.size();
  Vec w_mean = Vec::Zero(C);
  if (opt.duo_scaling) {
    int64_t rows = 0;
    for (const Mat* W : ws) {
      for (int64_t n = 0; n < W->rows(); ++n)
        for (int64_t g0 = 0; g0 < C; g0 += opt.group) {
          const float m = W->row(n).segment(g0, opt.group).cwiseAbs().maxCoeff() + 1e-6f;
          w_mean.segment(g0, opt.group) += (W->row(n).segment(g0, opt.group).cwiseAbs() / m).transpose();
        }
      rows += W->rows();
    }
    w_mean /= float(rows);
  }
  std::vector<Vec> out;
  for (int i = 0; i < opt.n_grid; ++i) {
    const float a = float(i) / float(opt.n_grid);
    Vec s = opt.duo_scaling ? Vec((x_mean.array().pow(a) / (w_mean.array().pow(1.0f - a) + 1e-4f)).max(1e-4f))
                            : Vec(x_mean.array().pow(a).max(1e-4f));
    s /= std::sqrt(s.maxCoeff() * s.minCoeff());
    for (float& v : s) v = std::isfinite(v) ? v : 1.0f;
    out.push_back(std::move(s));
  }
  return out;
}

AwqScaleChoice awq_choose(const std::vector<double>& losses, const std::vector<Vec>& candidates, const AwqOptions& opt,
                          int64_t layer, const std::string& group) {
  int best = -1;
  for (int i = 0; i < int(losses.size()); ++i)
    if (losses[size_t(i)] < (best < 0 ? INFINITY : losses[size_t(best)])) best = i;  // NaN never wins
  if (best < 0) fail("layer {}: the {} scale search found no finite loss", layer, group);
  return {double(best) / double(opt.n_grid), losses[0], losses[size_t(best)], candidates[size_t(best)]};
}

void awq_report_scales(AwqLayerReport& rep, std::initializer_list<const AwqScaleChoice*> groups) {
  for (const AwqScaleChoice* s : groups) {
    rep.ratio.push_back(s->ratio);
    rep.loss_ratio0.push_back(s->loss_ratio0);
    rep.loss_best.push_back(s->loss_best);
  }
}

void awq_scale_cols(Mat& W, const Vec& s) { W.array().rowwise() *= s.transpose().array(); }
void awq_unscale_rows(Mat& W, const Vec& s) { W.array().colwise() /= s.array(); }

void awq_store_layer(AwqResult& r, const LayerW& w, int64_t i, bool linears) {
  const std::string p = fmt::format("model.layers.{}.", i), a = p + "self_attn.", m = p + "mlp.";
  if (linears)
    for (auto [name, mat] : {std::pair{a + "q_proj.weight", &w.q}, {a + "k_proj.weight", &w.k}, {a + "v_proj.weight", &w.v},
                             {a + "o_proj.weight", &w.o}, {m + "gate_proj.weight", &w.gate}, {m + "up_proj.weight", &w.up},
                             {m + "down_proj.weight", &w.down}})
      store(r, name, *mat);
  store(r, p + "input_layernorm.weight", w.attn_norm);
  store(r, p + "post_attention_layernorm.weight", w.ffn_norm);
  if (w.bv.size()) store(r, a + "v_proj.bias", w.bv);
}

}  // namespace tmkit
