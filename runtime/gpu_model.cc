// GpuModel with CUDA. Precision plan: the residual stream and every GEMM output are fp32; GEMM
// inputs (weights, normed activations, attention output, SiLU(gate)*up) are fp16 whenever every
// weight fits fp16's range, bf16 workspaces included (as the references' ppl_fp16 protocol,
// "fp16 weights and compute"). Measured on small-llama (bf16): bf16 GEMM inputs put the logits
// 4.4e-3 (rel. L2) off the fp32 reference, fp16 ones 1e-3 (2^-12 vs 2^-9 rounding). A workspace
// with a weight beyond 65504 runs in bf16.
#include "gpu_model.h"

#include <algorithm>
#include <vector>

#include "cuda/cuda_utils.h"
#include "cuda/kernels.h"
#include "rope.h"
#include "w4a16_linear.h"

namespace tmkit {

namespace {

using cuda::DeviceBuffer;

// Host fp32 -> device T (the values came from T files, so the conversion is exact).
template <typename T>
DeviceBuffer<T> upload(const float* src, size_t n) {
  std::vector<uint16_t> bits(n);
  for (size_t i = 0; i < n; ++i)
    bits[i] = std::is_same_v<T, __half> ? float_to_half(src[i]) : float_to_bf16(src[i]);
  DeviceBuffer<T> d(n);
  TMKIT_CUDA_CHECK(cudaMemcpy(d.get(), bits.data(), n * 2, cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
DeviceBuffer<T> upload(const Mat& m) { return upload<T>(m.data(), size_t(m.size())); }
template <typename T>
DeviceBuffer<T> upload(const Vec& v) { return upload<T>(v.data(), size_t(v.size())); }

// Columns of several row-major matrices with the same rows, side by side.
Mat hcat(std::initializer_list<const Mat*> parts) {
  Eigen::Index cols = 0;
  for (const Mat* p : parts) cols += p->cols();
  Mat out((*parts.begin())->rows(), cols);
  Eigen::Index c = 0;
  for (const Mat* p : parts) {
    out.middleCols(c, p->cols()) = *p;
    c += p->cols();
  }
  return out;
}

}  // namespace

void gpu_kv_fake_quant(std::vector<float>& qkv, int T, int H, int KV, int D, int bits) {
  DeviceBuffer<float> d(qkv.size());
  TMKIT_CUDA_CHECK(cudaMemcpy(d.get(), qkv.data(), qkv.size() * 4, cudaMemcpyHostToDevice));
  cuda::kv_fake_quant(d.get(), T, H, KV, D, bits, nullptr);
  TMKIT_CUDA_CHECK(cudaMemcpy(qkv.data(), d.get(), qkv.size() * 4, cudaMemcpyDeviceToHost));
}

struct GpuModel::Impl {
  virtual ~Impl() = default;
  TmConfig cfg;
  std::string name;
  KvMode kv = KvMode::kFp16;
  // Leaves the logits of tokens on the device. With `use_cache`, the tokens follow the cached ones
  // and their K/V are appended to the cache.
  virtual void run(const int32_t* tokens, int64_t T, bool use_cache = false) = 0;
  virtual void reset(int64_t capacity) = 0;
  int64_t cached = 0, last_T = 0;
  virtual const float* logits() const = 0;
  virtual const int32_t* ids() const = 0;
  DeviceBuffer<float> nll;
};

namespace {

template <typename T>
struct ImplT final : GpuModel::Impl {
  struct Layer {
    DeviceBuffer<T> attn_norm, ffn_norm, wqkv, bqkv, wo, bo, w13, w2;
    std::unique_ptr<W4Linear> qkv4, wo4, w13_4, w2_4;  // int4 workspaces: these instead of the dense ones
  };
  std::vector<Layer> layers;
  DeviceBuffer<T> embed, output, norm;
  cublasHandle_t blas = nullptr;
  // Activations, grown to the longest sequence seen.
  DeviceBuffer<int32_t> ids_d;
  DeviceBuffer<float> x, qkv, delta, gu, logits_d, inv_freq;
  DeviceBuffer<T> h, attn, act;
  DeviceBuffer<float> k_cache, v_cache;  // [layers][capacity][KV * D], fp32 (K after RoPE, as attention reads it)
  int64_t capacity = 0;
  // Decode steps are replayed from one CUDA graph (a step is ~10 launches per layer, so small and
  // medium models are launch-bound otherwise); the position it runs at is read from pos_d.
  cudaStream_t stream = nullptr;
  DeviceBuffer<int> pos_d{1};
  DeviceBuffer<char> blas_workspace{32u << 20};
  cudaGraphExec_t decode_graph = nullptr;
  float rope_scaling = 1.0f;

  void reset(int64_t cap) override {
    const size_t row = size_t(cfg.kv_head_num * cfg.size_per_head);
    k_cache.resize(size_t(cfg.num_layer) * size_t(cap) * row);
    v_cache.resize(k_cache.size());
    if (decode_graph && cap != capacity) {  // the graph holds the old cache addresses and layout
      cudaGraphExecDestroy(decode_graph);
      decode_graph = nullptr;
    }
    capacity = cap;
    cached = 0;
  }

  explicit ImplT(const ModelWeights& w) {
    cfg = w.cfg;
    embed = upload<T>(w.embed);
    output = upload<T>(w.output);
    norm = upload<T>(w.norm);
    for (const LayerWeights& lw : w.layers) {
      Layer l;
      l.attn_norm = upload<T>(lw.attn_norm);
      l.ffn_norm = upload<T>(lw.ffn_norm);
      if (lw.qkv4) {
        l.qkv4 = std::make_unique<W4Linear>(*lw.qkv4);
        l.wo4 = std::make_unique<W4Linear>(*lw.wo4);
        l.w13_4 = std::make_unique<W4Linear>(*lw.w13_4);
        l.w2_4 = std::make_unique<W4Linear>(*lw.w2_4);
      } else {
        l.wqkv = upload<T>(hcat({&lw.wq, &lw.wk, &lw.wv}));
        l.wo = upload<T>(lw.wo);
        l.w13 = upload<T>(hcat({&lw.w1, &lw.w3}));
        l.w2 = upload<T>(lw.w2);
      }
      if (lw.bq.size()) {
        Vec b(lw.bq.size() + lw.bk.size() + lw.bv.size());
        b << lw.bq, lw.bk, lw.bv;
        l.bqkv = upload<T>(b);
      }
      if (lw.bo.size()) l.bo = upload<T>(lw.bo);
      layers.push_back(std::move(l));
    }
    TMKIT_CUBLAS_CHECK(cublasCreate(&blas));
    TMKIT_CUDA_CHECK(cudaStreamCreate(&stream));  // blocking: plain cudaMemcpy calls still order after its work
    TMKIT_CUBLAS_CHECK(cublasSetStream(blas, stream));
    // A fixed workspace: cuBLAS must not allocate while a graph is being captured.
    TMKIT_CUBLAS_CHECK(cublasSetWorkspace(blas, blas_workspace.get(), blas_workspace.size()));
  }
  ~ImplT() override {
    if (decode_graph) cudaGraphExecDestroy(decode_graph);
    if (blas) cublasDestroy(blas);
    if (stream) cudaStreamDestroy(stream);
  }

  // Y[M, N] (fp32) = X[M, K] * W[K, N], all row-major (cuBLAS sees the transposes, column-major).
  void gemm(const T* X, const T* W, float* Y, int M, int K, int N, bool w_transposed = false) {
    const float one = 1.0f, zero = 0.0f;
    constexpr cudaDataType_t t = cuda::TypeOf<T>::value;
    TMKIT_CUBLAS_CHECK(cublasGemmEx(blas, w_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, W, t,
                                    w_transposed ? K : N, X, t, K, &zero, Y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
  }

  // A linear layer: the dense weight through cuBLAS, or the int4 one through W4A16.
  DeviceBuffer<__half> w4_dense;
  void linear(const T* X, const DeviceBuffer<T>& W, const std::unique_ptr<W4Linear>& W4, float* Y, int M, int K, int N) {
    if (!W4) return gemm(X, W.get(), Y, M, K, N);
    if constexpr (std::is_same_v<T, __half>) W4->run(blas, X, M, Y, w4_dense, stream);
    else fail("int4 workspaces run with fp16 activations");
  }

  // Buffers for T tokens and the RoPE table for sequences of `seq_len` (graph capture needs both
  // ready: nothing may be allocated while capturing).
  void prepare(int T_, int64_t seq_len) {
    const int hid = int(cfg.hidden_units), H = int(cfg.head_num), KV = int(cfg.kv_head_num);
    const int D = int(cfg.size_per_head), V = int(cfg.vocab_size), qkv_w = (H + 2 * KV) * D;
    int inter = 0;
    for (int64_t i : cfg.inter_size) inter = std::max(inter, int(i));
    bool moved = ids_d.resize(size_t(T_));
    moved |= x.resize(size_t(T_) * hid);
    moved |= delta.resize(size_t(T_) * hid);
    moved |= qkv.resize(size_t(T_) * qkv_w);
    moved |= gu.resize(size_t(T_) * 2 * inter);
    moved |= logits_d.resize(size_t(T_) * V);
    moved |= nll.resize(size_t(T_));
    moved |= h.resize(size_t(T_) * hid);
    moved |= attn.resize(size_t(T_) * H * D);
    moved |= act.resize(size_t(T_) * inter);
    if (moved && decode_graph) {  // the graph holds the old addresses
      cudaGraphExecDestroy(decode_graph);
      decode_graph = nullptr;
    }
    const RopeTable rt = rope_table(cfg.rope(), cfg.rotary_embedding, cfg.max_position_embeddings, seq_len);
    inv_freq.resize(rt.inv_freq.size());
    TMKIT_CUDA_CHECK(cudaMemcpy(inv_freq.get(), rt.inv_freq.data(), rt.inv_freq.size() * 4, cudaMemcpyHostToDevice));
    rope_scaling = rt.attention_scaling;
  }

  void run(const int32_t* tokens, int64_t T64, bool use_cache) override {
    const int T_ = int(T64), V = int(cfg.vocab_size);
    for (int t = 0; t < T_; ++t)
      if (tokens[t] < 0 || tokens[t] >= V) fail("token id {} at position {} is outside the vocabulary [0, {})", tokens[t], t, V);
    const int pos0 = use_cache ? int(cached) : 0;
    if (use_cache && cached + T64 > capacity)
      fail("KV cache: {} cached + {} new tokens exceed the capacity {} given to reset()", cached, T64, capacity);
    // Decode steps replay one graph, unless the rotary table depends on the length (dynamic NTK).
    const bool graph = use_cache && T_ == 1 && cfg.rope().type != "dynamic";
    if (graph && !decode_graph) {
      prepare(1, capacity);
      cudaGraph_t g;
      TMKIT_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      enqueue(1, 0, pos_d.get(), true);
      TMKIT_CUDA_CHECK(cudaStreamEndCapture(stream, &g));
      TMKIT_CUDA_CHECK(cudaGraphInstantiate(&decode_graph, g, 0));
      cudaGraphDestroy(g);
    }
    if (!graph) prepare(T_, pos0 + T64);
    TMKIT_CUDA_CHECK(cudaMemcpyAsync(ids_d.get(), tokens, size_t(T_) * 4, cudaMemcpyHostToDevice, stream));
    if (graph) {
      TMKIT_CUDA_CHECK(cudaMemcpyAsync(pos_d.get(), &pos0, 4, cudaMemcpyHostToDevice, stream));
      TMKIT_CUDA_CHECK(cudaGraphLaunch(decode_graph, stream));
    } else {
      enqueue(T_, pos0, nullptr, use_cache);
    }
    TMKIT_CUDA_CHECK(cudaStreamSynchronize(stream));  // the host values copied above must outlive the copies
    last_T = T64;
    if (use_cache) cached += T64;
  }

  // The forward pass of T tokens at positions pos0.. (or *pos_dev..), as kernels on `stream`.
  void enqueue(int T_, int pos0, const int* pos_dev, bool use_cache) {
    const int hid = int(cfg.hidden_units), H = int(cfg.head_num), KV = int(cfg.kv_head_num);
    const int D = int(cfg.size_per_head), V = int(cfg.vocab_size), qkv_w = (H + 2 * KV) * D;
    const float eps = float(cfg.norm_eps);
    const float scale = cfg.softmax_scale > 0 ? float(cfg.softmax_scale) : 1.0f / std::sqrt(float(D));
    const cudaStream_t s = stream;

    cuda::embedding<T>(ids_d.get(), T_, embed.get(), hid, x.get(), s);
    for (size_t li = 0; li < layers.size(); ++li) {
      Layer& l = layers[li];
      const int I = int(cfg.inter_size[li]);
      cuda::add_rmsnorm<T>(x.get(), li ? delta.get() : nullptr, nullptr, l.attn_norm.get(), eps, T_, hid, h.get(), s);
      linear(h.get(), l.wqkv, l.qkv4, qkv.get(), T_, hid, qkv_w);
      cuda::bias_rope<T>(qkv.get(), l.bqkv.size() ? l.bqkv.get() : nullptr, inv_freq.get(), rope_scaling, T_, H, KV, D,
                         int(cfg.rotary_embedding), pos0, pos_dev, s);
      if (kv != KvMode::kFp16) cuda::kv_fake_quant(qkv.get(), T_, H, KV, D, int(kv), s);
      const size_t row = size_t(KV) * D;
      if (use_cache) {  // append this chunk's K and V rows to the layer's cache, then attend over the cache
        float* kc = k_cache.get() + li * size_t(capacity) * row;
        float* vc = v_cache.get() + li * size_t(capacity) * row;
        cuda::kv_append(qkv.get(), T_, H, KV, D, pos0, pos_dev, kc, vc, s);
        cuda::attention_prefill<T>(qkv.get(), size_t(qkv_w), kc, vc, row, T_, pos0, pos_dev, H, KV, D, scale, attn.get(), s);
      } else {
        cuda::attention_prefill<T>(qkv.get(), size_t(qkv_w), qkv.get() + size_t(H) * D, qkv.get() + size_t(H + KV) * D,
                                   size_t(qkv_w), T_, 0, nullptr, H, KV, D, scale, attn.get(), s);
      }
      linear(attn.get(), l.wo, l.wo4, delta.get(), T_, H * D, hid);
      cuda::add_rmsnorm<T>(x.get(), delta.get(), l.bo.size() ? l.bo.get() : nullptr, l.ffn_norm.get(), eps, T_, hid,
                           h.get(), s);
      linear(h.get(), l.w13, l.w13_4, gu.get(), T_, hid, 2 * I);
      cuda::silu_mul<T>(gu.get(), T_, I, act.get(), s);
      linear(act.get(), l.w2, l.w2_4, delta.get(), T_, I, hid);
    }
    cuda::add_rmsnorm<T>(x.get(), delta.get(), nullptr, norm.get(), eps, T_, hid, h.get(), s);
    gemm(h.get(), output.get(), logits_d.get(), T_, hid, V, /*w_transposed=*/true);  // output is [V_pad, hid]
  }
  const float* logits() const override { return logits_d.get(); }
  const int32_t* ids() const override { return ids_d.get(); }
};

}  // namespace

bool GpuModel::available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

namespace {
bool fits_fp16(const ModelWeights& w) {
  float m = std::max({w.embed.cwiseAbs().maxCoeff(), w.output.cwiseAbs().maxCoeff(), w.norm.cwiseAbs().maxCoeff()});
  for (const LayerWeights& l : w.layers)
    for (const Mat* x : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w3, &l.w2}) m = std::max(m, x->cwiseAbs().maxCoeff());
  return m < 65504.0f;
}
}  // namespace

GpuModel::GpuModel(const ModelWeights& w, KvMode kv) {
  if (!available()) fail("--device cuda: no CUDA device is available");
  const bool fp16 = w.cfg.weight_dtype() == DType::F16 || fits_fp16(w);  // int4 workspaces are F16
  if (fp16) impl_ = std::make_unique<ImplT<__half>>(w);
  else impl_ = std::make_unique<ImplT<__nv_bfloat16>>(w);
  impl_->kv = kv;
  cudaDeviceProp prop{};
  TMKIT_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  impl_->name = std::string(prop.name) + (fp16 ? ", fp16" : ", bf16");
}

GpuModel::~GpuModel() = default;
const TmConfig& GpuModel::config() const { return impl_->cfg; }
std::string GpuModel::device_name() const { return impl_->name; }

Mat GpuModel::forward(const int32_t* tokens, int64_t T) {
  impl_->run(tokens, T);
  Mat logits(T, impl_->cfg.vocab_size);
  TMKIT_CUDA_CHECK(cudaMemcpy(logits.data(), impl_->logits(), size_t(logits.size()) * 4, cudaMemcpyDeviceToHost));
  return logits;
}

void GpuModel::reset(int64_t capacity) { impl_->reset(capacity); }
void GpuModel::append(const int32_t* tokens, int64_t T) { impl_->run(tokens, T, /*use_cache=*/true); }
int64_t GpuModel::position() const { return impl_->cached; }
void GpuModel::synchronize() const { TMKIT_CUDA_CHECK(cudaDeviceSynchronize()); }

Mat GpuModel::last_logits() const {
  Mat logits(impl_->last_T, impl_->cfg.vocab_size);
  TMKIT_CUDA_CHECK(cudaMemcpy(logits.data(), impl_->logits(), size_t(logits.size()) * 4, cudaMemcpyDeviceToHost));
  return logits;
}

void GpuModel::nll_sums(const int32_t* tokens, int64_t T, double* sum, double* sum_sq) {
  impl_->run(tokens, T);
  const int V = int(impl_->cfg.vocab_size);
  cuda::nll_rows(impl_->logits(), V, V, impl_->ids() + 1, int(T - 1), impl_->nll.get(), nullptr);
  std::vector<float> nll(size_t(T - 1));
  TMKIT_CUDA_CHECK(cudaMemcpy(nll.data(), impl_->nll.get(), nll.size() * 4, cudaMemcpyDeviceToHost));
  *sum = *sum_sq = 0.0;
  for (float v : nll) {
    *sum += v;
    *sum_sq += double(v) * v;
  }
}

}  // namespace tmkit
