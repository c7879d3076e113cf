#include <chrono>
#include <cmath>

#include "awq_layer.h"
#include "error.h"
#include "rtn.h"

namespace tmkit {

namespace {

// x W^T (+ b): W in the HF orientation [out, in].
Mat linear(const Mat& x, const Mat& W, const Vec& b) {
  Mat y = x * W.transpose();
  if (b.size()) y.rowwise() += b.transpose();
  return y;
}

// The calibration shape: B sequences of `seqlen` tokens (rows b seqlen + t at position t).
using Shape = AwqShape;

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

// §1: the ratio whose scaled, fake-quantized weights reproduce `org` best; `inspect` recomputes
// the compared output from the group's weights.
AwqScaleChoice search_scale(const Mat& x, const std::vector<const Mat*>& ws, const Mat& org,
                         const std::function<Mat(const std::vector<Mat>&)>& inspect, const AwqOptions& opt,
                         int64_t layer, const std::string& what) {
  const Vec x_mean = x.cwiseAbs().colwise().mean().transpose();
  const std::vector<Vec> cands = awq_scale_candidates(x_mean, ws, opt);
  std::vector<double> losses;
  for (const Vec& s : cands) {
    std::vector<Mat> q;
    for (const Mat* W : ws) {
      const Mat scaled = (W->array().rowwise() * s.transpose().array()).matrix();
      q.push_back((pseudo_quant(scaled, opt.group).array().rowwise() / s.transpose().array()).matrix());
    }
    losses.push_back((org - inspect(q)).squaredNorm() / double(org.size()));
  }
  return awq_choose(losses, cands, opt, layer, what);
}

// §3: per (row, group), the shrink of max|w| whose quantization reproduces x·w best on sampled
// tokens; W is clamped in place. Returns the sum of chosen max / org_max and the group count.
std::pair<double, int64_t> clip(Mat& W, const Mat& x, const AwqOptions& opt) {
  const int64_t step = awq_clip_step(x.rows(), opt), n_tok = (x.rows() + step - 1) / step;
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

}  // namespace

AwqResult awq_search_cpu(const fs::path& hf_dir, const std::vector<int32_t>& tokens, int64_t blocks, int64_t seqlen,
                         const AwqOptions& opt, const AwqProgress& progress) {
  const Shape c = awq_shape(hf_dir, tokens.size(), blocks, seqlen, opt);
  const Checkpoint ck(hf_dir);
  Mat x = awq_embed(ck, c, tokens);

  AwqResult result;
  for (int64_t i = 0; i < c.hf.layers; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    LayerW w = awq_read_layer(ck, c, i);

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
      AwqScaleChoice s1, s2, s3, s4;  // ratio -1: not searched
      if (c.searches(0))
        s1 = search_scale(xa, {&w.q, &w.k, &w.v}, attn_out, [&](const std::vector<Mat>& q) {
          return linear(attention_core(xa, q[0], q[1], q[2], w, c), w.o, w.bo);
        }, opt, i, "q/k/v");
      if (c.searches(1))
        s2 = search_scale(o_in, {&w.o}, attn_out, [&](const std::vector<Mat>& q) { return linear(o_in, q[0], w.bo); }, opt,
                          i, "o_proj");
      if (c.searches(2))
        s3 = search_scale(xm, {&w.gate, &w.up}, mlp_out, [&](const std::vector<Mat>& q) {
          return Mat(mlp_act(xm, q[0], q[1]) * w.down.transpose());
        }, opt, i, "gate/up");
      if (c.searches(3))
        s4 = search_scale(d_in, {&w.down}, mlp_out, [&](const std::vector<Mat>& q) { return Mat(d_in * q[0].transpose()); },
                          opt, i, "down_proj");
      awq_report_scales(rep, {&s1, &s2, &s3, &s4});
      const auto unscale_cols = [](Mat& X, const Vec& s) { X.array().rowwise() /= s.transpose().array(); };
      if (c.searches(0)) {
        w.attn_norm.array() /= s1.s.array();
        for (Mat* W : {&w.q, &w.k, &w.v}) awq_scale_cols(*W, s1.s);
        unscale_cols(xa, s1.s);
      }
      if (c.searches(1)) {
        awq_unscale_rows(w.v, s2.s);
        if (w.bv.size()) w.bv.array() /= s2.s.array();
        awq_scale_cols(w.o, s2.s);
        unscale_cols(o_in, s2.s);
      }
      if (c.searches(2)) {
        w.ffn_norm.array() /= s3.s.array();
        for (Mat* W : {&w.gate, &w.up}) awq_scale_cols(*W, s3.s);
        unscale_cols(xm, s3.s);
      }
      if (c.searches(3)) {
        awq_unscale_rows(w.up, s4.s);
        awq_scale_cols(w.down, s4.s);
        unscale_cols(d_in, s4.s);
      }
    }
    if (opt.clip) {  // q and k are skipped (their error is amplified by the q k^T product)
      double sum = 0;
      int64_t n = 0;
      for (auto [W, in, quant] : {std::tuple{&w.v, &xa, c.quant_hidden}, {&w.o, &o_in, c.quant_o},
                                  {&w.gate, &xm, c.quant_hidden}, {&w.up, &xm, c.quant_hidden},
                                  {&w.down, &d_in, c.quant_down}}) {
        if (!quant) continue;
        const auto [s, k] = clip(*W, *in, opt);
        sum += s;
        n += k;
      }
      rep.clip_mean_ratio = n ? sum / double(n) : 1.0;
    }
    awq_store_layer(result, w, i);
    x = std::move(next);
    rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    result.layers.push_back(rep);
    if (progress) progress(rep, c.hf.layers);
  }
  return result;
}

}  // namespace tmkit
