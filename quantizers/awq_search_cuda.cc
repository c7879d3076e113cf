// The AWQ search on the GPU: the CPU search's algorithm and choice rules (awq_layer.h), with the
// reference tools' arithmetic: fp16 GEMM inputs (weights, normed activations, attention output,
// SiLU(gate)*up) and fp32 accumulation through cuBLAS; the layer's forward pass is the runtime's
// kernels (RMSNorm, RoPE, flash-style attention, SiLU). Per layer, on the device:
//   1. the forward on the unquantized weights keeps the inputs of the linears (fp16) and the
//      outputs the groups are compared on (fp32), and leaves the next layer's input;
//   2. each scale group tries its n_grid candidates: fake-quantized weights (one kernel), the
//      inspected module's output, its mean squared error (deterministic reduction), all queued
//      without a host round trip; the losses come back together and the host picks (awq_choose);
//   3. the scales are applied to the fp32 master weights and the cached inputs;
//   4. the clip search: every candidate's weight error as fp16 deltas, one batched GEMM per
//      chunk of groups against the sampled tokens, per-(row, group) error means, argmin, clamp.
// Only one layer's weights and activations live on the device; the host reads the next layer
// from the mmapped checkpoint meanwhile.
#include <chrono>
#include <future>

#include "awq_layer.h"
#include "cuda/awq_kernels.h"
#include "cuda/kernels.h"
#include "error.h"

namespace tmkit {

namespace {

using cuda::DeviceBuffer;

template <typename T>
void to_device(DeviceBuffer<T>& d, const T* src, size_t n) {
  d.resize(n);
  TMKIT_CUDA_CHECK(cudaMemcpy(d.get(), src, n * sizeof(T), cudaMemcpyHostToDevice));
}

template <typename T>
void from_device(T* dst, const T* src, size_t n) {
  TMKIT_CUDA_CHECK(cudaMemcpy(dst, src, n * sizeof(T), cudaMemcpyDeviceToHost));
}

DeviceBuffer<__half> half_vector(const Vec& v) {
  std::vector<uint16_t> bits(size_t(v.size()));
  for (size_t i = 0; i < bits.size(); ++i) bits[i] = float_to_half(v(Eigen::Index(i)));
  DeviceBuffer<__half> d(bits.size());
  TMKIT_CUDA_CHECK(cudaMemcpy(d.get(), bits.data(), bits.size() * 2, cudaMemcpyHostToDevice));
  return d;
}

// HF q/k heads rotate the halves (j, j + D/2), the runtime's RoPE kernel the pairs (2j, 2j + 1):
// row t of a head in pair order is HF row pair_row(t), as hf2tm writes workspaces. Permuting a
// linear's output rows changes neither its per-row quantization groups nor the attention output.
int64_t pair_row(int64_t t, int64_t D) { return (t % 2) * (D / 2) + t / 2; }

template <typename M>
M to_pairs(const M& hf, int64_t D) {
  M out(hf.rows(), hf.cols());
  for (int64_t r = 0; r < hf.rows(); ++r) out.row(r) = hf.row(r / D * D + pair_row(r % D, D));
  return out;
}

template <typename M>
M from_pairs(const M& pairs, int64_t D) {
  M out(pairs.rows(), pairs.cols());
  for (int64_t r = 0; r < pairs.rows(); ++r) out.row(r / D * D + pair_row(r % D, D)) = pairs.row(r);
  return out;
}

enum class Inspect { kAttention, kOProj, kMlp, kDownProj };

class GpuSearch {
 public:
  GpuSearch(const AwqShape& c, const AwqOptions& opt) : c_(c), opt_(opt) {
    T_ = int(c.T), hid_ = int(c.hid), H_ = int(c.H), KV_ = int(c.KV), D_ = int(c.D), I_ = int(c.I);
    HD_ = H_ * D_, qkv_w_ = (H_ + 2 * KV_) * D_;
    steps_ = int(opt.max_shrink * opt.n_grid);
    clip_step_ = int(awq_clip_step(c.T, opt));
    n_tok_ = (T_ + clip_step_ - 1) / clip_step_;
    if (c.T > (int64_t(1) << 24)) fail("awq: {} calibration tokens are too many for one pass (at most 2^24)", c.T);
    allocate();
    TMKIT_CUBLAS_CHECK(cublasCreate(&blas_));
    TMKIT_CUDA_CHECK(cudaStreamCreate(&stream_));  // blocking: plain cudaMemcpy orders after its work
    TMKIT_CUBLAS_CHECK(cublasSetStream(blas_, stream_));
    TMKIT_CUBLAS_CHECK(cublasSetWorkspace(blas_, blas_workspace_.get(), blas_workspace_.size()));
    to_device(inv_freq_, c.rope.inv_freq.data(), c.rope.inv_freq.size());
  }
  ~GpuSearch() {
    if (blas_) cublasDestroy(blas_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  GpuSearch(const GpuSearch&) = delete;
  GpuSearch& operator=(const GpuSearch&) = delete;

  void set_input(const Mat& x) { to_device(x_, x.data(), size_t(x.size())); }

  // One layer: forward, scale search, clip search; `w`'s norms and v bias come back scaled, its
  // linears quantized and packed into `result` (pack_layer).
  AwqLayerReport run_layer(LayerW& w, int64_t layer, AwqResult& result) {
    AwqLayerReport rep;
    rep.layer = layer;
    auto t = std::chrono::steady_clock::now();
    const auto phase = [&](const char* name) {  // the device's share of each step, for the report
      TMKIT_CUDA_CHECK(cudaStreamSynchronize(stream_));
      const auto now = std::chrono::steady_clock::now();
      rep.phases.emplace_back(name, std::chrono::duration<double>(now - t).count());
      t = now;
    };
    load(w);
    phase("load");
    forward(w, layer);
    phase("forward");
    if (opt_.search_scale) search_and_apply_scales(w, layer, rep);
    phase("scales");
    if (opt_.clip) {
      const int64_t v_off = int64_t(H_ + KV_) * D_ * hid_;
      double sum = 0;
      int64_t n = 0;
      for (auto [W, rows, K, X, quant] : {std::tuple{wqkv_.get() + v_off, KV_ * D_, hid_, xa_.get(), c_.quant_hidden},
                                          {wo_.get(), hid_, HD_, o_in_.get(), c_.quant_o},
                                          {wgu_.get(), 2 * I_, hid_, xm_.get(), c_.quant_hidden},
                                          {wd_.get(), hid_, I_, d_in_.get(), c_.quant_down}}) {
        if (!quant) continue;
        const auto [s, k] = clip(W, rows, K, X);
        sum += s;
        n += k;
      }
      rep.clip_mean_ratio = n ? sum / double(n) : 1.0;
    }
    phase("clip");
    pack_layer(layer, result);
    phase("pack");
    size_t free = 0, total = 0;
    TMKIT_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    peak_ = std::max(peak_, total - free);
    return rep;
  }
  size_t peak_device_bytes() const { return peak_; }

 private:
  const AwqShape& c_;
  const AwqOptions& opt_;
  int T_, hid_, H_, KV_, D_, I_, HD_, qkv_w_, steps_, clip_step_, n_tok_;
  cublasHandle_t blas_ = nullptr;
  cudaStream_t stream_ = nullptr;
  DeviceBuffer<char> blas_workspace_{32u << 20};  // fixed: no allocation inside cuBLAS calls
  // fp32 masters in the HF orientation W[out, in] (q/k rows in pair order; q|k|v and gate|up
  // stacked by rows: quantization groups are per row, so stacking changes nothing) and fp16 copies.
  DeviceBuffer<float> wqkv_, wo_, wgu_, wd_;
  DeviceBuffer<__half> wqkv16_, wo16_, wgu16_, wd16_, cand16_, attn_norm16_, ffn_norm16_, bqkv16_, bo16_;
  DeviceBuffer<float> inv_freq_;
  // Activations: the residual stream x, GEMM outputs (fp32), GEMM inputs (fp16).
  DeviceBuffer<float> x_, qkv_, attn_out_, gu_, mlp_out_, out_;
  DeviceBuffer<__half> xa_, o_in_, o_cand_, xm_, d_in_, act_cand_;
  // Search scratch.
  DeviceBuffer<float> mean_partial_, x_mean_, s_, clip_c_, clip_err_, clip_ratio_;
  DeviceBuffer<double> loss_partial_{size_t(cuda::kSqDiffBlocks)}, losses_;
  DeviceBuffer<__half> deltas_;
  // The final quantization's outputs (the largest linear's size).
  DeviceBuffer<uint8_t> codes_, zero_codes_;
  DeviceBuffer<int32_t> qweight_, qzeros_;
  DeviceBuffer<__half> scales16_;
  DeviceBuffer<int> flag_{1};
  size_t peak_ = 0;
  size_t clip_chunk_bytes_ = 0;

  void allocate() {
    const size_t T = size_t(T_), hid = size_t(hid_), HD = size_t(HD_), I = size_t(I_), qkv_w = size_t(qkv_w_);
    const size_t w_qkv = qkv_w * hid, w_o = hid * HD, w_gu = 2 * I * hid, w_d = hid * I;
    const size_t w_max = std::max({w_qkv, w_o, w_gu, w_d});
    // The clipped linears (v, o, gate|up, down): the most weights, rows x steps, and row groups.
    const size_t clip_w = std::max({size_t(KV_ * D_) * hid, w_o, w_gu, w_d}), clip_groups = clip_w / size_t(opt_.group);
    const size_t max_m = size_t(steps_) * std::max({size_t(KV_ * D_), hid, 2 * I});
    const size_t per_group = max_m * size_t(n_tok_) * 4;  // one group's error products
    clip_chunk_bytes_ = std::max(per_group, std::min(size_t(1) << 30, per_group * std::max({hid, HD, I}) / size_t(opt_.group)));
    const size_t f32 = T * (hid * 4 + qkv_w + 2 * I) + (w_qkv + w_o + w_gu + w_d) + clip_chunk_bytes_ / 4 +
                       size_t(steps_ + 1) * clip_groups + w_max / 2;  // the last: packing scratch
    const size_t f16 = T * (2 * hid + 2 * HD + 2 * I) + (w_qkv + w_o + w_gu + w_d) + w_max + size_t(steps_) * clip_w;
    cuda::require_device_memory(f32 * 4 + f16 * 2, 0,
                                fmt::format("the AWQ search of {} calibration tokens (fewer: --calib-samples)", T));
    for (auto [buf, n] : {std::pair{&x_, T * hid}, {&qkv_, T * qkv_w}, {&attn_out_, T * hid}, {&gu_, T * 2 * I},
                          {&mlp_out_, T * hid}, {&out_, T * hid}, {&wqkv_, w_qkv}, {&wo_, w_o}, {&wgu_, w_gu},
                          {&wd_, w_d}, {&clip_c_, clip_chunk_bytes_ / 4}, {&clip_err_, size_t(steps_) * clip_groups},
                          {&clip_ratio_, clip_groups}})
      buf->resize(n);
    for (auto [buf, n] : {std::pair{&xa_, T * hid}, {&xm_, T * hid}, {&o_in_, T * HD}, {&o_cand_, T * HD},
                          {&d_in_, T * I}, {&act_cand_, T * I}, {&wqkv16_, w_qkv}, {&wo16_, w_o}, {&wgu16_, w_gu},
                          {&wd16_, w_d}, {&cand16_, w_max}, {&deltas_, size_t(steps_) * clip_w}})
      buf->resize(n);
    const size_t linear = std::max(HD * hid, I * hid), groups = linear / size_t(opt_.group);
    codes_.resize(linear);
    zero_codes_.resize(groups);
    qweight_.resize(linear / 8);
    qzeros_.resize(groups / 8 + 1);
    scales16_.resize(groups);
    const size_t widest = std::max({hid, HD, I});
    mean_partial_.resize(cuda::awq_col_mean_partials(int(widest)));
    x_mean_.resize(widest);
    s_.resize(size_t(opt_.n_grid) * widest);
    losses_.resize(size_t(opt_.n_grid));
  }

  void upload_master(DeviceBuffer<float>& master, DeviceBuffer<__half>& half, const Mat& W) {
    to_device(master, W.data(), size_t(W.size()));
    cuda::awq_to_half(master.get(), size_t(W.size()), half.get(), stream_);
  }

  void load(const LayerW& w) {
    Mat qkv(qkv_w_, hid_), gu(2 * I_, hid_);
    qkv << to_pairs(w.q, D_), to_pairs(w.k, D_), w.v;
    gu << w.gate, w.up;
    upload_master(wqkv_, wqkv16_, qkv);
    upload_master(wo_, wo16_, w.o);
    upload_master(wgu_, wgu16_, gu);
    upload_master(wd_, wd16_, w.down);
    attn_norm16_ = half_vector(w.attn_norm);
    ffn_norm16_ = half_vector(w.ffn_norm);
    if (w.bq.size()) {
      Vec b(qkv_w_);
      b << to_pairs(w.bq, D_), to_pairs(w.bk, D_), w.bv;
      bqkv16_ = half_vector(b);
    }
    if (w.bo.size()) bo16_ = half_vector(w.bo);
  }

  // The final quantization of one linear (rows [row0, row0 + N) of a master), packed on the device.
  AwqPackedLinear pack(const float* W, int N, int K, bool pairs) {
    const int64_t group = opt_.group;
    cuda::awq_quantize_pack(W, N, K, int(group), pairs ? D_ : 0, codes_.get(), zero_codes_.get(), qweight_.get(),
                            qzeros_.get(), scales16_.get(), stream_);
    AwqPackedLinear p;
    p.K = K;
    p.N = N;
    p.group = group;
    p.qweight.resize(size_t(K) * N / 8);
    p.qzeros.resize(size_t(K / group) * N / 8);
    p.scales.resize(size_t(K / group) * N);
    from_device(p.qweight.data(), qweight_.get(), p.qweight.size());
    from_device(p.qzeros.data(), qzeros_.get(), p.qzeros.size());
    from_device(p.scales.data(), reinterpret_cast<const uint16_t*>(scales16_.get()), p.scales.size());
    return p;
  }

  // The layer's linears: packed when their input channels split into groups, otherwise (kept
  // fp16 by --skip-indivisible) as fp32 values in the HF layout, scaled like the rest.
  void pack_layer(int64_t layer, AwqResult& out) {
    const std::string a = fmt::format("model.layers.{}.self_attn.", layer), m = fmt::format("model.layers.{}.mlp.", layer);
    const size_t hid = size_t(hid_);
    const auto emit = [&](const std::string& name, const float* W, int N, int K, bool pairs, bool quant) {
      if (quant) {
        out.packed[name] = pack(W, N, K, pairs);
        return;
      }
      Mat values(N, K);
      from_device(values.data(), W, size_t(values.size()));
      if (pairs) values = from_pairs(values, D_);
      out.tensors[name].assign(values.data(), values.data() + values.size());
    };
    emit(a + "q_proj.weight", wqkv_.get(), HD_, hid_, true, c_.quant_hidden);
    emit(a + "k_proj.weight", wqkv_.get() + HD_ * hid, KV_ * D_, hid_, true, c_.quant_hidden);
    emit(a + "v_proj.weight", wqkv_.get() + (HD_ + KV_ * D_) * hid, KV_ * D_, hid_, false, c_.quant_hidden);
    emit(a + "o_proj.weight", wo_.get(), hid_, HD_, false, c_.quant_o);
    emit(m + "gate_proj.weight", wgu_.get(), I_, hid_, false, c_.quant_hidden);
    emit(m + "up_proj.weight", wgu_.get() + size_t(I_) * hid, I_, hid_, false, c_.quant_hidden);
    emit(m + "down_proj.weight", wd_.get(), hid_, I_, false, c_.quant_down);
  }

  // Y[M, N] (fp32) = X[M, K] W^T, W[N, K] row-major fp16.
  void gemm(const __half* X, const __half* W, float* Y, int M, int K, int N) {
    const float one = 1.0f, zero = 0.0f;
    TMKIT_CUBLAS_CHECK(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, W, CUDA_R_16F, K, X, CUDA_R_16F, K,
                                    &zero, Y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  // q/k/v of every calibration block (qkv, in place: bias and RoPE) -> attention output (fp16).
  void attention(float* qkv, __half* out) {
    const int B = int(c_.blocks), S = int(c_.seqlen), rot = int(2 * c_.rope.inv_freq.size());
    cuda::bias_rope<__half>(qkv, bqkv16_.size() ? bqkv16_.get() : nullptr, inv_freq_.get(), c_.rope.attention_scaling,
                            B, S, H_, KV_, D_, rot, 0, nullptr, stream_);
    cuda::attention_prefill<__half>(qkv, size_t(qkv_w_), qkv + size_t(HD_), qkv + size_t(HD_ + KV_ * D_),
                                    size_t(qkv_w_), B, S, H_, KV_, D_, c_.scale, out, stream_);
  }

  void forward(const LayerW& w, int64_t layer) {
    const float eps = float(c_.eps);
    const size_t n = size_t(T_) * hid_;
    cuda::add_rmsnorm<__half>(x_.get(), nullptr, nullptr, attn_norm16_.get(), eps, T_, hid_, xa_.get(), stream_);
    gemm(xa_.get(), wqkv16_.get(), qkv_.get(), T_, hid_, qkv_w_);
    attention(qkv_.get(), o_in_.get());
    gemm(o_in_.get(), wo16_.get(), attn_out_.get(), T_, HD_, hid_);  // o bias: added to x only (it cancels in losses)
    cuda::add_rmsnorm<__half>(x_.get(), attn_out_.get(), w.bo.size() ? bo16_.get() : nullptr, ffn_norm16_.get(), eps,
                              T_, hid_, xm_.get(), stream_);
    gemm(xm_.get(), wgu16_.get(), gu_.get(), T_, hid_, 2 * I_);
    cuda::silu_mul<__half>(gu_.get(), T_, I_, false, d_in_.get(), stream_);
    gemm(d_in_.get(), wd16_.get(), mlp_out_.get(), T_, I_, hid_);
    cuda::awq_add(x_.get(), mlp_out_.get(), n, stream_);
    int flag = 0;
    TMKIT_CUDA_CHECK(cudaMemcpy(flag_.get(), &flag, 4, cudaMemcpyHostToDevice));
    cuda::awq_flag_nonfinite(x_.get(), n, flag_.get(), stream_);
    from_device(&flag, flag_.get(), 1);
    if (flag) fail("layer {}: the layer output (calibration activations) holds NaN or Inf", layer);
  }

  // The inspected module's output on the candidate weights in cand16_, into out_.
  void inspect(Inspect what) {
    switch (what) {
      case Inspect::kAttention:
        gemm(xa_.get(), cand16_.get(), qkv_.get(), T_, hid_, qkv_w_);
        attention(qkv_.get(), o_cand_.get());
        gemm(o_cand_.get(), wo16_.get(), out_.get(), T_, HD_, hid_);
        break;
      case Inspect::kOProj: gemm(o_in_.get(), cand16_.get(), out_.get(), T_, HD_, hid_); break;
      case Inspect::kMlp:
        gemm(xm_.get(), cand16_.get(), gu_.get(), T_, hid_, 2 * I_);
        cuda::silu_mul<__half>(gu_.get(), T_, I_, false, act_cand_.get(), stream_);
        gemm(act_cand_.get(), wd16_.get(), out_.get(), T_, I_, hid_);
        break;
      case Inspect::kDownProj: gemm(d_in_.get(), cand16_.get(), out_.get(), T_, I_, hid_); break;
    }
  }

  // §1 for one group: input X [T, C] (fp16), its weights stacked in W [rows, C] (fp32 master),
  // compared on `org` [T, hid]. `host_ws` (HF layout) feed the duo-scaling weight statistic.
  AwqScaleChoice search_scale(const __half* X, int C, const float* W, int rows, const std::vector<const Mat*>& host_ws,
                           Inspect what, const float* org, int64_t layer, const std::string& name) {
    cuda::awq_col_abs_mean(X, T_, C, mean_partial_.get(), x_mean_.get(), stream_);
    Vec x_mean(C);
    from_device(x_mean.data(), x_mean_.get(), size_t(C));
    const std::vector<Vec> cands = awq_scale_candidates(x_mean, host_ws, opt_);
    std::vector<float> all;
    for (const Vec& s : cands) all.insert(all.end(), s.data(), s.data() + C);
    TMKIT_CUDA_CHECK(cudaMemcpy(s_.get(), all.data(), all.size() * 4, cudaMemcpyHostToDevice));
    for (size_t i = 0; i < cands.size(); ++i) {
      cuda::awq_fake_quant(W, rows, C, s_.get() + i * C, int(opt_.group), cand16_.get(), stream_);
      inspect(what);
      cuda::awq_mean_sq_diff(org, out_.get(), size_t(T_) * hid_, loss_partial_.get(), losses_.get() + i, stream_);
    }
    std::vector<double> losses(cands.size());
    from_device(losses.data(), losses_.get(), losses.size());
    return awq_choose(losses, cands, opt_, layer, name);
  }

  const float* upload_scale(const Vec& s) {
    TMKIT_CUDA_CHECK(cudaMemcpy(s_.get(), s.data(), size_t(s.size()) * 4, cudaMemcpyHostToDevice));
    return s_.get();
  }

  void search_and_apply_scales(LayerW& w, int64_t layer, AwqLayerReport& rep) {
    const int64_t v_off = int64_t(H_ + KV_) * D_ * hid_;
    AwqScaleChoice s1, s2, s3, s4;  // ratio -1: not searched
    if (c_.searches(0))
      s1 = search_scale(xa_.get(), hid_, wqkv_.get(), qkv_w_, {&w.q, &w.k, &w.v}, Inspect::kAttention, attn_out_.get(),
                        layer, "q/k/v");
    if (c_.searches(1))
      s2 = search_scale(o_in_.get(), HD_, wo_.get(), hid_, {&w.o}, Inspect::kOProj, attn_out_.get(), layer, "o_proj");
    if (c_.searches(2))
      s3 = search_scale(xm_.get(), hid_, wgu_.get(), 2 * I_, {&w.gate, &w.up}, Inspect::kMlp, mlp_out_.get(), layer,
                        "gate/up");
    if (c_.searches(3))
      s4 = search_scale(d_in_.get(), I_, wd_.get(), hid_, {&w.down}, Inspect::kDownProj, mlp_out_.get(), layer,
                        "down_proj");
    awq_report_scales(rep, {&s1, &s2, &s3, &s4});
    // Applied as the CPU search does (the function is unchanged in exact arithmetic).
    if (c_.searches(0)) {
      w.attn_norm.array() /= s1.s.array();
      cuda::awq_scale_cols(wqkv_.get(), qkv_w_, hid_, upload_scale(s1.s), stream_);
      cuda::awq_unscale_cols(xa_.get(), T_, hid_, s_.get(), stream_);
    }
    if (c_.searches(1)) {
      if (w.bv.size()) w.bv.array() /= s2.s.array();
      cuda::awq_unscale_rows(wqkv_.get() + v_off, KV_ * D_, hid_, upload_scale(s2.s), stream_);
      cuda::awq_scale_cols(wo_.get(), hid_, HD_, s_.get(), stream_);
      cuda::awq_unscale_cols(o_in_.get(), T_, HD_, s_.get(), stream_);
    }
    if (c_.searches(2)) {
      w.ffn_norm.array() /= s3.s.array();
      cuda::awq_scale_cols(wgu_.get(), 2 * I_, hid_, upload_scale(s3.s), stream_);
      cuda::awq_unscale_cols(xm_.get(), T_, hid_, s_.get(), stream_);
    }
    if (c_.searches(3)) {
      cuda::awq_unscale_rows(wgu_.get() + size_t(I_) * hid_, I_, hid_, upload_scale(s4.s), stream_);
      cuda::awq_scale_cols(wd_.get(), hid_, I_, s_.get(), stream_);
      cuda::awq_unscale_cols(d_in_.get(), T_, I_, s_.get(), stream_);
    }
  }

  // §3 on W [rows, K] (fp32 master, clamped in place) with inputs X [T, K]. Returns the sum of
  // chosen max / org max and the group count.
  std::pair<double, int64_t> clip(float* W, int rows, int K, const __half* X) {
    const int group = int(opt_.group), groups = K / group, m = steps_ * rows;
    if (steps_ <= 0) return {double(rows) * groups, int64_t(rows) * groups};
    cuda::awq_clip_deltas(W, rows, K, group, steps_, opt_.n_grid, deltas_.get(), stream_);
    const size_t per_group = size_t(m) * n_tok_ * 4;
    const int chunk = int(std::max<size_t>(1, std::min<size_t>(size_t(groups), clip_chunk_bytes_ / per_group)));
    const float one = 1.0f, zero = 0.0f;
    for (int g0 = 0; g0 < groups; g0 += chunk) {
      const int nb = std::min(chunk, groups - g0);
      // C_g [m, n_tok] = delta_g [m, group] x_g^T: the sampled tokens are every clip_step-th row of X.
      TMKIT_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
          blas_, CUBLAS_OP_T, CUBLAS_OP_N, m, n_tok_, group, &one, deltas_.get() + size_t(g0) * group, CUDA_R_16F, K,
          group, X + size_t(g0) * group, CUDA_R_16F, int64_t(clip_step_) * K, group, &zero, clip_c_.get(), CUDA_R_32F,
          m, int64_t(m) * n_tok_, nb, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      cuda::awq_sq_mean_cols(clip_c_.get(), m, n_tok_, nb, clip_err_.get() + size_t(g0) * m, stream_);
    }
    cuda::awq_clip_apply(W, rows, K, group, steps_, opt_.n_grid, clip_err_.get(), clip_ratio_.get(), stream_);
    std::vector<float> ratio(size_t(rows) * groups);
    from_device(ratio.data(), clip_ratio_.get(), ratio.size());
    double sum = 0;
    for (int g = 0; g < groups; ++g)
      for (int r = 0; r < rows; ++r) sum += ratio[size_t(r) * groups + g];
    return {sum, int64_t(rows) * groups};
  }
};

}  // namespace

AwqResult awq_search_cuda(const fs::path& hf_dir, const std::vector<int32_t>& tokens, int64_t blocks, int64_t seqlen,
                          const AwqOptions& opt, const AwqProgress& progress) {
  const AwqShape c = awq_shape(hf_dir, tokens.size(), blocks, seqlen, opt);
  const Checkpoint ck(hf_dir);
  GpuSearch gpu(c, opt);
  gpu.set_input(awq_embed(ck, c, tokens));
  AwqResult result;
  std::future<LayerW> next = std::async(std::launch::async, [&] { return awq_read_layer(ck, c, 0); });
  for (int64_t i = 0; i < c.hf.layers; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    LayerW w = next.get();
    if (i + 1 < c.hf.layers) next = std::async(std::launch::async, [&, i] { return awq_read_layer(ck, c, i + 1); });
    AwqLayerReport rep = gpu.run_layer(w, i, result);
    awq_store_layer(result, w, i, false);
    rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    result.layers.push_back(rep);
    if (progress) progress(rep, c.hf.layers);
  }
  result.peak_device_bytes = gpu.peak_device_bytes();
  return result;
}

}  // namespace tmkit
