#include "cpu_forward.h"

#include <algorithm>
#include <cmath>

#include "error.h"
#include "host_memory.h"
#include "rope.h"

namespace tmkit {

Mat rms_norm(const Mat& x, const Vec& w, double eps) {
  Mat y(x.rows(), x.cols());
  for (int64_t t = 0; t < x.rows(); ++t) {
    const float inv = 1.0f / std::sqrt(x.row(t).squaredNorm() / float(x.cols()) + float(eps));
    y.row(t) = (x.row(t) * inv).cwiseProduct(w.transpose());
  }
  return y;
}

namespace {

// Rotates adjacent channel pairs (2j, 2j+1) of every head by position * inv_freq[j].
void apply_rope(Mat& x, int64_t heads, int64_t D, const RopeTable& rt) {
  for (int64_t t = 0; t < x.rows(); ++t) {
    for (int64_t j = 0; j < int64_t(rt.inv_freq.size()); ++j) {  // the first rotary_embedding channels
      const float angle = float(t) * rt.inv_freq[size_t(j)];
      const float c = std::cos(angle) * rt.attention_scaling, s = std::sin(angle) * rt.attention_scaling;
      for (int64_t h = 0; h < heads; ++h) {
        float& a = x(t, h * D + 2 * j);
        float& b = x(t, h * D + 2 * j + 1);
        const float a0 = a, b0 = b;
        a = a0 * c - b0 * s;
        b = a0 * s + b0 * c;
      }
    }
  }
}

}  // namespace

Mat attention(const Mat& q, const Mat& k, const Mat& v, int64_t H, int64_t KV, int64_t D, float scale) {
  const int64_t T = q.rows(), G = H / KV;
  Mat out(T, H * D);
  Mat scores(T, T);
  for (int64_t h = 0; h < H; ++h) {
    const int64_t kvh = h / G;
    scores.noalias() = q.middleCols(h * D, D) * k.middleCols(kvh * D, D).transpose();
    for (int64_t i = 0; i < T; ++i) {
      float m = -INFINITY;
      for (int64_t j = 0; j <= i; ++j) m = std::max(m, scores(i, j) * scale);
      float sum = 0.0f;
      for (int64_t j = 0; j <= i; ++j) sum += (scores(i, j) = std::exp(scores(i, j) * scale - m));
      for (int64_t j = 0; j <= i; ++j) scores(i, j) /= sum;
      for (int64_t j = i + 1; j < T; ++j) scores(i, j) = 0.0f;
    }
    out.middleCols(h * D, D).noalias() = scores * v.middleCols(kvh * D, D);
  }
  return out;
}


CpuModel::CpuModel(ModelWeights w, KvQuant kv) : w_(std::move(w)), kv_(std::move(kv)) {
  const int64_t n = w_.cfg.kv_head_num * w_.cfg.size_per_head;
  if (kv_.is_static() && int64_t(kv_.layers.size()) != w_.cfg.num_layer)
    fail("static KV scales: {} layers for a model of {}", kv_.layers.size(), w_.cfg.num_layer);
  for (const KvStaticLayer& l : kv_.layers)
    for (const auto* p : {&l.k_scale, &l.k_zero, &l.v_scale, &l.v_zero})
      if (int64_t(p->size()) != n) fail("static KV scales: {} values per layer for {} kv channels", p->size(), n);
}

uint64_t CpuModel::forward_bytes(int64_t T) const {
  const TmConfig& c = w_.cfg;
  int64_t inter = 0;
  for (int64_t i : c.inter_size) inter = std::max(inter, i);
  const int64_t qkv = (c.head_num + 2 * c.kv_head_num) * c.size_per_head;
  // Per row: the residual stream and the norm's output throughout, plus the largest of what one
  // phase holds: attention (one head's scores, q, k, v and their copies for RoPE, the output),
  // the MLP (gate, up, their product) or the LM head (the logits). Within 10% of the peak
  // resident size measured on tiny-llama at T = 4096 and 8192.
  const double per_row = 2.0 * double(c.hidden_units) +
                         std::max({double(T) + 2.0 * double(qkv) + double(c.head_num * c.size_per_head), 3.0 * double(inter),
                                   double(c.vocab_padded())});
  return uint64_t(4.0 * double(T) * per_row);
}

void check_host_memory(const CpuModel& model, int64_t T, int64_t concurrent, const std::string& flag) {
  const uint64_t available = host_available_bytes();
  const double need = double(model.forward_bytes(T)) * double(concurrent);
  if (available == 0 || need <= double(available)) return;
  constexpr double kGiB = 1073741824.0;
  fail("{} {}: the CPU oracle needs about {:.1f} GiB for {} of {} tokens at a time ([{}, {}] logits and [{}, {}] attention "
       "scores in fp32 each); {:.1f} GiB of host memory is available; lower {}{}",
       flag, T, need / kGiB, concurrent > 1 ? fmt::format("{} forwards (one a thread)", concurrent) : "a forward", T, T,
       model.config().vocab_size, T, T, double(available) / kGiB, flag, concurrent > 1 ? " or -t" : "");
}

Mat CpuModel::forward(const int32_t* tokens, int64_t T, const KvObserver* observe) const {
  const TmConfig& c = w_.cfg;
  const int64_t hid = c.hidden_units, H = c.head_num, KV = c.kv_head_num, D = c.size_per_head;
  const float scale = c.softmax_scale > 0 ? float(c.softmax_scale) : 1.0f / std::sqrt(float(D));
  const RopeTable rt = rope_table(c.rope(), c.rotary_embedding, c.max_position_embeddings, T);

  Mat x(T, hid);
  for (int64_t t = 0; t < T; ++t) {
    if (tokens[t] < 0 || tokens[t] >= c.vocab_size) fail("token id {} at position {} is outside the vocabulary [0, {})", tokens[t], t, c.vocab_size);
    x.row(t) = w_.embed.row(tokens[t]);
  }
  for (size_t li = 0; li < w_.layers.size(); ++li) {
    const LayerWeights& l = w_.layers[li];
    Mat h = rms_norm(x, l.attn_norm, c.norm_eps);
    Mat q = h * l.wq, k = h * l.wk, v = h * l.wv;
    if (l.bq.size()) {
      q.rowwise() += l.bq.transpose();
      k.rowwise() += l.bk.transpose();
      v.rowwise() += l.bv.transpose();
    }
    const Mat k_pre = observe ? k : Mat();
    if (kv_.is_static()) {  // K's parameters are those of K before RoPE (calib/kv_calibrate.h says why)
      const KvStaticLayer& p = kv_.layers[li];
      for (int64_t t = 0; t < T; ++t) {
        kv_static_fake_quant(k.row(t).data(), int(KV * D), p.k_scale.data(), p.k_zero.data(), kv_.bits());
        kv_static_fake_quant(v.row(t).data(), int(KV * D), p.v_scale.data(), p.v_zero.data(), kv_.bits());
      }
    }
    apply_rope(q, H, D, rt);
    apply_rope(k, KV, D, rt);
    if (observe) (*observe)(int64_t(li), k_pre, k, v);
    // K and V as the KV cache would hold them (fp16, or int8/int4 codes), as every runtime does.
    if (!kv_.is_static())
      for (Mat* m : {&k, &v})
        for (int64_t t = 0; t < T; ++t)
          for (int64_t h = 0; h < KV; ++h) kv_cache_roundtrip(m->row(t).data() + h * D, int(D), kv_.mode);
    x.noalias() += attention(q, k, v, H, KV, D, scale) * l.wo;
    if (l.bo.size()) x.rowwise() += l.bo.transpose();

    h = rms_norm(x, l.ffn_norm, c.norm_eps);
    Mat gate = h * l.w1;
    const Mat up = h * l.w3;
    gate = gate.array() / (1.0f + (-gate.array()).exp());  // SiLU
    x.noalias() += gate.cwiseProduct(up) * l.w2;
  }
  const Mat y = rms_norm(x, w_.norm, c.norm_eps);
  return y * w_.output.topRows(c.vocab_size).transpose();
}

}  // namespace tmkit
