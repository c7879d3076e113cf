#include "awq_search.h"

#include <chrono>
#include <cmath>

#include "cpu_forward.h"
#include "error.h"
#include "hf_config.h"
#include "rope.h"
#include "rtn.h"
#include "safetensors.h"

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

// x W^T (+ b): W in the HF orientation [out, in].
Mat linear(const Mat& x, const Mat& W, const Vec& b) {
  Mat y = x * W.transpose();
  if (b.size()) y.rowwise() += b.transpose();
  return y;
}

// One decoder layer in the HF layout (q/k heads rotate halves (j, j + D/2)).
struct LayerW {
  Mat q, k, v, o, gate, up, down;
  Vec bq, bk, bv, bo, attn_norm, ffn_norm;
};

struct Shape {
  int64_t H, KV, D, blocks, seqlen;
  float scale;
  RopeTable rope;
  double eps;
};

void rope_halves(Mat& x, int64_t heads, const Shape& c) {
  const int64_t half = int64_t(c.rope.inv_freq.size());
  for (int64_t t = 0; t < x.rows(); ++t) {
    const float pos = float(t % c.seqlen);
    for (int64_t j = 0; j < half; ++j) {
      const float angle = pos * c.rope.inv_freq[size_t(j)];
      const float cs = std::cos(angle) * c.rope.attention_scaling, sn = std::sin(angle) * c.rope.attention_scaling;
      for (int64_t h = 0; h < heads; ++h) {
        float& a = x(t, h * c.D + j);
        float& b = x(t, h * c.D + j + half);
        const float a0 = a, b0 = b;
        a = a0 * cs - b0 * sn;
        b = b0 * cs + a0 * sn;
      }
    }
  }
}

// The attention output before o_proj, each calibration block its own causal sequence.
Mat attention_core(const Mat& x, const Mat& Wq, const Mat& Wk, const Mat& Wv, const LayerW& w, const Shape& c) {
  Mat q = linear(x, Wq, w.bq), k = linear(x, Wk, w.bk);
  const Mat v = linear(x, Wv, w.bv);
  rope_halves(q, c.H, c);
  rope_halves(k, c.KV, c);
  Mat out(x.rows(), c.H * c.D);
  for (int64_t b = 0; b < c.blocks; ++b) {
    const Mat qb = q.middleRows(b * c.seqlen, c.seqlen), kb = k.middleRows(b * c.seqlen, c.seqlen),
              vb = v.middleRows(b * c.seqlen, c.seqlen);
    out.middleRows(b * c.seqlen, c.seqlen) = attention(qb, kb, vb, c.H, c.KV, c.D, c.scale);
  }
  return out;
}

Mat mlp_act(const Mat& x, const Mat& Wg, const Mat& Wu) {
  const Mat g = x * Wg.transpose(), u = x * Wu.transpose();
  return (g.array() / (1.0f + (-g.array()).exp()) * u.array()).matrix();
}

// The reference pseudo-quantizer (rtn.h, fp16 steps) on every row's groups of `group` columns.
Mat pseudo_quant(const Mat& W, int64_t group) {
  Mat out(W.rows(), W.cols());
  for (int64_t n = 0; n < W.rows(); ++n)
    for (int64_t g0 = 0; g0 < W.cols(); g0 += group) {
      float lo = INFINITY, hi = -INFINITY;
      for (int64_t k = g0; k < g0 + group; ++k) {
        lo = std::fmin(lo, fp16_round(W(n, k)));
        hi = std::fmax(hi, fp16_round(W(n, k)));
      }
      const QuantGroup p = quant_group(lo, hi);
      for (int64_t k = g0; k < g0 + group; ++k) out(n, k) = dequant(quant_code(fp16_round(W(n, k)), p), p);
    }
  return out;
}

void check_finite(const Mat& m, int64_t layer, const std::string& what) {
  if (!m.allFinite()) fail("layer {}: {} holds NaN or Inf", layer, what);
}

struct ScaleChoice {
  double ratio = -1, loss_ratio0 = 0, loss_best = 0;
  Vec s;
};

// §1: the ratio whose scaled, fake-quantized weights reproduce `org` best; `inspect` recomputes
// the compared output from the group's weights.
ScaleChoice search_scale(const Mat& x, const std::vector<const Mat*>& ws, const Mat& org,
                         const std::function<Mat(const std::vector<Mat>&)>& inspect, const AwqOptions& opt,
                         int64_t layer, const std::string& what) {
  const Vec x_mean = x.cwiseAbs().colwise().mean().transpose();
  Vec w_mean = Vec::Zero(x.cols());
  if (opt.duo_scaling) {
    int64_t rows = 0;
    for (const Mat* W : ws) {
      for (int64_t n = 0; n < W->rows(); ++n)
        for (int64_t g0 = 0; g0 < W->cols(); g0 += opt.group) {
          const float m = W->row(n).segment(g0, opt.group).cwiseAbs().maxCoeff() + 1e-6f;
          w_mean.segment(g0, opt.group) += (W->row(n).segment(g0, opt.group).cwiseAbs() / m).transpose();
        }
      rows += W->rows();
    }
    w_mean /= float(rows);
  }
  ScaleChoice best;
  best.loss_best = INFINITY;
  for (int i = 0; i < opt.n_grid; ++i) {
    const float a = float(i) / float(opt.n_grid);
    Vec s = opt.duo_scaling ? Vec((x_mean.array().pow(a) / (w_mean.array().pow(1.0f - a) + 1e-4f)).max(1e-4f))
                            : Vec(x_mean.array().pow(a).max(1e-4f));
    s /= std::sqrt(s.maxCoeff() * s.minCoeff());
    for (float& v : s) v = std::isfinite(v) ? v : 1.0f;
    std::vector<Mat> q;
    for (const Mat* W : ws) {
      const Mat scaled = (W->array().rowwise() * s.transpose().array()).matrix();
      q.push_back((pseudo_quant(scaled, opt.group).array().rowwise() / s.transpose().array()).matrix());
    }
    const double loss = (org - inspect(q)).squaredNorm() / double(org.size());
    if (i == 0) best.loss_ratio0 = loss;
    if (loss < best.loss_best) {  // strictly lower: ties keep the smaller ratio
      best.loss_best = loss;
      best.ratio = double(i) / double(opt.n_grid);
      best.s = s;
    }
  }
  if (best.ratio < 0) fail("layer {}: the {} scale search found no finite loss", layer, what);
  return best;
}

// §3: per (row, group), the shrink of max|w| whose quantization reproduces x·w best on sampled
// tokens; W is clamped in place. Returns the sum of chosen max / org_max and the group count.
std::pair<double, int64_t> clip(Mat& W, const Mat& x, const AwqOptions& opt) {
  const int64_t step = std::max<int64_t>(1, x.rows() / opt.clip_tokens), n_tok = (x.rows() + step - 1) / step;
  Mat xs(n_tok, x.cols());
  for (int64_t t = 0; t < n_tok; ++t) xs.row(t) = x.row(t * step);
  const int steps = int(opt.max_shrink * opt.n_grid);
  double ratio_sum = 0;
  int64_t count = 0;
  for (int64_t g0 = 0; g0 < W.cols(); g0 += opt.group) {
    const Mat xg = xs.middleCols(g0, opt.group), wg = W.middleCols(g0, opt.group);
    const Mat y = xg * wg.transpose();
    const Vec org_max = wg.cwiseAbs().rowwise().maxCoeff();
    Vec best_err = Vec::Constant(W.rows(), 1e9f), best_max = org_max;
    for (int i = 0; i < steps; ++i) {
      const Vec mv = org_max * (1.0f - float(i) / float(opt.n_grid));
      Mat c = wg;
      for (int64_t n = 0; n < c.rows(); ++n) c.row(n) = c.row(n).cwiseMax(-mv(n)).cwiseMin(mv(n));
      const Vec err = (xg * pseudo_quant(c, opt.group).transpose() - y).array().square().colwise().mean().transpose();
      for (int64_t n = 0; n < W.rows(); ++n)
        if (err(n) < best_err(n)) {
          best_err(n) = err(n);
          best_max(n) = mv(n);
        }
    }
    for (int64_t n = 0; n < W.rows(); ++n) {
      W.row(n).segment(g0, opt.group) = W.row(n).segment(g0, opt.group).cwiseMax(-best_max(n)).cwiseMin(best_max(n));
      ratio_sum += org_max(n) > 0 ? best_max(n) / org_max(n) : 1.0;
      ++count;
    }
  }
  return {ratio_sum, count};
}

void store(AwqResult& r, const std::string& name, const Mat& m) { r.tensors[name].assign(m.data(), m.data() + m.size()); }
void store(AwqResult& r, const std::string& name, const Vec& v) { r.tensors[name].assign(v.data(), v.data() + v.size()); }

}  // namespace

AwqResult awq_search_cpu(const fs::path& hf_dir, const std::vector<int32_t>& tokens, int64_t blocks, int64_t seqlen,
                         const AwqOptions& opt, const AwqProgress& progress) {
  const HfConfig hf = load_hf_config(hf_dir);
  if (hf.arch == Arch::InternLM2 || hf.awq.present)
    fail("{}: the AWQ search takes fp16/bf16/fp32 Llama, Mistral or Qwen2 checkpoints", (hf_dir / "config.json").string());
  if (int64_t(tokens.size()) != blocks * seqlen) fail("awq: {} calibration tokens for {} blocks of {}", tokens.size(), blocks, seqlen);
  const Checkpoint ck(hf_dir);
  const int64_t hid = hf.hidden, H = hf.heads, KV = hf.kv_heads, D = hf.head_dim, I = hf.inter, T = blocks * seqlen;
  for (auto [k, name] : {std::pair{hid, "q_proj"}, {H * D, "o_proj"}, {I, "down_proj"}})
    if (k % opt.group)
      fail("{}: model.layers.*.{}.weight has {} input channels, not a multiple of the group size {}", hf_dir.string(),
           name, k, opt.group);
  const Shape c{H, KV, D, blocks, seqlen, 1.0f / std::sqrt(float(D)),
                rope_table(hf.rope, D, hf.max_position_embeddings, seqlen), hf.norm_eps};

  const Mat embed = read_mat(ck, "model.embed_tokens.weight", hf.vocab, hid);
  Mat x(T, hid);
  for (int64_t t = 0; t < T; ++t) {
    if (tokens[size_t(t)] < 0 || tokens[size_t(t)] >= hf.vocab) fail("awq: calibration token {} outside the vocabulary", tokens[size_t(t)]);
    x.row(t) = embed.row(tokens[size_t(t)]);
  }

  AwqResult result;
  for (int64_t i = 0; i < hf.layers; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string p = fmt::format("model.layers.{}.", i), a = p + "self_attn.", m = p + "mlp.";
    LayerW w;
    w.q = read_mat(ck, a + "q_proj.weight", H * D, hid);
    w.k = read_mat(ck, a + "k_proj.weight", KV * D, hid);
    w.v = read_mat(ck, a + "v_proj.weight", KV * D, hid);
    w.o = read_mat(ck, a + "o_proj.weight", hid, H * D);
    w.gate = read_mat(ck, m + "gate_proj.weight", I, hid);
    w.up = read_mat(ck, m + "up_proj.weight", I, hid);
    w.down = read_mat(ck, m + "down_proj.weight", hid, I);
    if (hf.attn_bias) {
      w.bq = read_vec(ck, a + "q_proj.bias", H * D);
      w.bk = read_vec(ck, a + "k_proj.bias", KV * D);
      w.bv = read_vec(ck, a + "v_proj.bias", KV * D);
    }
    if (ck.has(a + "o_proj.bias")) w.bo = read_vec(ck, a + "o_proj.bias", hid);
    w.attn_norm = read_vec(ck, p + "input_layernorm.weight", hid);
    w.ffn_norm = read_vec(ck, p + "post_attention_layernorm.weight", hid);
    for (auto [name, mat] : {std::pair{"q_proj", &w.q}, {"k_proj", &w.k}, {"v_proj", &w.v}, {"o_proj", &w.o},
                             {"gate_proj", &w.gate}, {"up_proj", &w.up}, {"down_proj", &w.down}})
      check_finite(*mat, i, std::string(name) + ".weight");

    // The layer on the unquantized weights: the inputs of its linears, its outputs, the next input.
    Mat xa = rms_norm(x, w.attn_norm, c.eps);
    Mat o_in = attention_core(xa, w.q, w.k, w.v, w, c);
    const Mat attn_out = linear(o_in, w.o, w.bo);
    const Mat h = x + attn_out;
    Mat xm = rms_norm(h, w.ffn_norm, c.eps);
    Mat d_in = mlp_act(xm, w.gate, w.up);
    const Mat mlp_out = d_in * w.down.transpose();
    Mat next = h + mlp_out;
    check_finite(next, i, "the layer output (calibration activations)");

    AwqLayerReport rep;
    rep.layer = i;
    if (opt.search_scale) {
      // §2's groups, all searched on the original weights, then applied together.
      const ScaleChoice s1 = search_scale(xa, {&w.q, &w.k, &w.v}, attn_out, [&](const std::vector<Mat>& q) {
        return linear(attention_core(xa, q[0], q[1], q[2], w, c), w.o, w.bo);
      }, opt, i, "q/k/v");
      ScaleChoice s2;  // o_proj only when v_proj's output matches o_proj's input and output (MHA)
      const bool mha = w.v.rows() == w.o.rows() && w.v.cols() == w.o.cols();
      if (mha) s2 = search_scale(o_in, {&w.o}, attn_out, [&](const std::vector<Mat>& q) { return linear(o_in, q[0], w.bo); },
                                 opt, i, "o_proj");
      const ScaleChoice s3 = search_scale(xm, {&w.gate, &w.up}, mlp_out, [&](const std::vector<Mat>& q) {
        return Mat(mlp_act(xm, q[0], q[1]) * w.down.transpose());
      }, opt, i, "gate/up");
      const ScaleChoice s4 = search_scale(d_in, {&w.down}, mlp_out, [&](const std::vector<Mat>& q) {
        return Mat(d_in * q[0].transpose());
      }, opt, i, "down_proj");
      for (const ScaleChoice* s : std::initializer_list<const ScaleChoice*>{&s1, &s2, &s3, &s4}) {
        rep.ratio.push_back(s->ratio);
        rep.loss_ratio0.push_back(s->loss_ratio0);
        rep.loss_best.push_back(s->loss_best);
      }
      const auto scale_cols = [](Mat& W, const Vec& s) { W.array().rowwise() *= s.transpose().array(); };
      const auto unscale_cols = [](Mat& X, const Vec& s) { X.array().rowwise() /= s.transpose().array(); };
      w.attn_norm.array() /= s1.s.array();
      for (Mat* W : {&w.q, &w.k, &w.v}) scale_cols(*W, s1.s);
      unscale_cols(xa, s1.s);
      if (mha) {
        w.v.array().colwise() /= s2.s.array();
        if (w.bv.size()) w.bv.array() /= s2.s.array();
        scale_cols(w.o, s2.s);
        unscale_cols(o_in, s2.s);
      }
      w.ffn_norm.array() /= s3.s.array();
      for (Mat* W : {&w.gate, &w.up}) scale_cols(*W, s3.s);
      unscale_cols(xm, s3.s);
      w.up.array().colwise() /= s4.s.array();
      scale_cols(w.down, s4.s);
      unscale_cols(d_in, s4.s);
    }
    if (opt.clip) {  // q and k are skipped (their error is amplified by the q k^T product)
      double sum = 0;
      int64_t n = 0;
      for (auto [W, in] : {std::pair{&w.v, &xa}, {&w.o, &o_in}, {&w.gate, &xm}, {&w.up, &xm}, {&w.down, &d_in}}) {
        const auto [s, k] = clip(*W, *in, opt);
        sum += s;
        n += k;
      }
      rep.clip_mean_ratio = n ? sum / double(n) : 1.0;
    }
    for (auto [name, mat] : {std::pair{a + "q_proj.weight", &w.q}, {a + "k_proj.weight", &w.k}, {a + "v_proj.weight", &w.v},
                             {a + "o_proj.weight", &w.o}, {m + "gate_proj.weight", &w.gate}, {m + "up_proj.weight", &w.up},
                             {m + "down_proj.weight", &w.down}})
      store(result, name, *mat);
    store(result, p + "input_layernorm.weight", w.attn_norm);
    store(result, p + "post_attention_layernorm.weight", w.ffn_norm);
    if (w.bv.size()) store(result, a + "v_proj.bias", w.bv);
    x = std::move(next);
    rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    result.layers.push_back(rep);
    if (progress) progress(rep, hf.layers);
  }
  return result;
}

}  // namespace tmkit
