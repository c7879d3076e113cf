// GpuModel with CUDA. Precision plan: the residual stream and every GEMM output are fp32; GEMM
// inputs (weights, normed activations, attention output, SiLU(gate)*up) are fp16 whenever every
// weight fits fp16's range, bf16 workspaces included (as the references' ppl_fp16 protocol,
// "fp16 weights and compute"). Measured on small-llama (bf16): bf16 GEMM inputs put the logits
// 4.4e-3 (rel. L2) off the fp32 reference, fp16 ones 1e-3 (2^-12 vs 2^-9 rounding). A workspace
// with a weight beyond 65504 runs in bf16.
#include "gpu_model.h"

#include <algorithm>
#include <thread>
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

size_t gpu_kv_cache_roundtrip(const std::vector<float>& qkv, int T, int H, int KV, int D, KvMode mode,
                              std::vector<float>* k, std::vector<float>* v) {
  if (qkv.size() != size_t(T) * (H + 2 * KV) * D) fail("gpu_kv_cache_roundtrip: qkv has {} values", qkv.size());
  DeviceBuffer<float> d(qkv.size());
  TMKIT_CUDA_CHECK(cudaMemcpy(d.get(), qkv.data(), qkv.size() * 4, cudaMemcpyHostToDevice));
  cuda::KvCache cache;
  const int bits = mode == KvMode::kFp16 ? 16 : int(mode);
  cache.allocate(bits, 1, 1, KV, D, T);
  const cuda::KvLayer l = cache.layer(0);
  cuda::kv_append(d.get(), 1, T, H, l, 0, nullptr, nullptr);
  // Decode what the device holds by the layout of cuda/kv_cache.h: rows (kv head, token), params apart.
  const size_t rows = size_t(KV) * T, row_bytes = l.row_bytes();
  for (int which = 0; which < 2; ++which) {
    std::vector<uint8_t> codes(rows * row_bytes);
    std::vector<uint16_t> params(bits < 16 ? rows * 2 : 0);  // (scale, zero) fp16 bits per row
    TMKIT_CUDA_CHECK(cudaMemcpy(codes.data(), which ? l.v : l.k, codes.size(), cudaMemcpyDeviceToHost));
    if (bits < 16)
      TMKIT_CUDA_CHECK(cudaMemcpy(params.data(), which ? l.v_param : l.k_param, params.size() * 2, cudaMemcpyDeviceToHost));
    std::vector<float>& out = which ? *v : *k;
    out.assign(rows * D, 0.0f);
    for (size_t r = 0; r < rows; ++r)
      for (int c = 0; c < D; ++c) {
        const uint8_t* row = codes.data() + r * row_bytes;
        if (bits == 16) {
          out[r * D + c] = half_to_float(uint16_t(row[2 * c] | row[2 * c + 1] << 8));
          continue;
        }
        const float q = float(bits == 8 ? row[c] : (row[c / 2] >> (4 * (c % 2))) & 0xf);
        const float scale = half_to_float(params[2 * r]), zero = half_to_float(params[2 * r + 1]);
        out[r * D + c] = q * scale + zero;
      }
  }
  return cache.bytes();
}

struct GpuModel::Impl {
  virtual ~Impl() = default;
  TmConfig cfg;
  std::string name;
  KvMode kv = KvMode::kFp16;
  // Runs B sequences of T tokens (tokens: B * T ids, sequence-major) and leaves their logits on the
  // device. With `use_cache`, the tokens follow the cached ones and their K/V are appended to the
  // cache. With `nll_only`, the logits are not kept: nll() holds -log p(next id) of every row but
  // the last (the LM head runs in slabs of rows, so no [B T, vocab] buffer is needed).
  virtual void run(const int32_t* tokens, int64_t B, int64_t T, bool use_cache, bool nll_only) = 0;
  virtual void reset(int64_t capacity, int64_t batch) = 0;
  virtual size_t cache_bytes() const = 0;
  int64_t cached = 0, last_rows = 0, cache_batch = 0;
  virtual const float* logits() const = 0;
  DeviceBuffer<float> nll;
};

namespace {

// KV storage bits of a mode: fp16 stores halves.
int kv_bits(KvMode m) { return m == KvMode::kFp16 ? 16 : int(m); }

// Rows of the LM head per slab when only the NLL is wanted (ppl): bounds the logits buffer to
// kLogitSlab x vocab floats whatever the batch, at full GEMM efficiency.
constexpr int kLogitSlab = 2048;

template <typename T>
struct ImplT final : GpuModel::Impl {
  struct Layer {
    DeviceBuffer<T> attn_norm, ffn_norm, wqkv, bqkv, wo, bo, w13, w2;
    std::unique_ptr<W4Linear> qkv4, wo4, w13_4, w2_4;  // int4 workspaces: these instead of the dense ones
  };
  std::vector<Layer> layers;
  DeviceBuffer<T> embed, output, norm;
  cublasHandle_t blas = nullptr;
  // Activations, grown to the most rows (sequences x tokens) seen.
  DeviceBuffer<int32_t> ids_d;
  DeviceBuffer<float> x, qkv, delta, gu, logits_d, inv_freq;
  DeviceBuffer<T> h, attn, act;
  cuda::KvCache cache;                // cuda/kv_cache.h: fp16, or int8/int4 codes with fp16 scale and zero
  DeviceBuffer<float> decode_scratch;  // attention_decode's per-chunk partials
  int64_t capacity = 0;
  // Decode steps are replayed from one CUDA graph (a step is ~10 launches per layer, so small and
  // medium models are launch-bound otherwise); the position it runs at is read from pos_d.
  cudaStream_t stream = nullptr;
  DeviceBuffer<int> pos_d{1};
  DeviceBuffer<char> blas_workspace{32u << 20};
  cudaGraphExec_t decode_graph = nullptr;
  float rope_scaling = 1.0f;

  void drop_graph() {
    if (decode_graph) cudaGraphExecDestroy(decode_graph);
    decode_graph = nullptr;
  }

  void reset(int64_t cap, int64_t batch) override {
    const int H = int(cfg.head_num), KV = int(cfg.kv_head_num), D = int(cfg.size_per_head);
    if (cap < 1) fail("KV cache: capacity {} must be at least 1 token", cap);
    if (batch < 1 || batch > 65535) fail("KV cache: batch {} is outside 1 .. 65535 sequences", batch);
    bool moved = cache.allocate(kv_bits(kv), int(layers.size()), int(batch), KV, D, cap);
    const size_t scratch = cuda::attention_decode_scratch_floats(int(batch), cuda::kDecodeMaxTokens, H, D, int(cap));
    cuda::require_device_memory(scratch * 4, decode_scratch.size() * 4,
                                fmt::format("decode scratch for {} sequences x {} tokens", batch, cap));
    moved |= decode_scratch.resize(scratch);
    // The graph holds the cache's addresses, its batch, and a grid sized by the capacity.
    if (moved || cap != capacity || batch != cache_batch) drop_graph();
    capacity = cap;
    cache_batch = batch;
    cached = 0;
  }
  size_t cache_bytes() const override { return capacity ? cache.bytes() : 0; }
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
    drop_graph();
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

  // Buffers for `rows` token rows (`logit_rows` of logits) and the RoPE table for sequences of
  // `seq_len` (graph capture needs both ready: nothing may be allocated while capturing). `what`
  // names the forward for the message when the device cannot hold it.
  void prepare(int rows, int logit_rows, int64_t seq_len, const std::string& what) {
    const int hid = int(cfg.hidden_units), H = int(cfg.head_num), KV = int(cfg.kv_head_num);
    const int D = int(cfg.size_per_head), V = int(cfg.vocab_size), qkv_w = (H + 2 * KV) * D;
    int inter = 0;
    for (int64_t i : cfg.inter_size) inter = std::max(inter, int(i));
    const size_t n = size_t(rows);
    const size_t f32 = n * (2 * hid + qkv_w + 2 * inter + 1) + size_t(logit_rows) * V, half = n * (hid + H * D + inter);
    const size_t held = (x.size() + delta.size() + qkv.size() + gu.size() + nll.size() + logits_d.size()) * 4 +
                        (h.size() + attn.size() + act.size()) * 2 + ids_d.size() * 4;
    cuda::require_device_memory(f32 * 4 + half * 2 + n * 4, held, what);
    bool moved = ids_d.resize(n);
    moved |= x.resize(n * hid);
    moved |= delta.resize(n * hid);
    moved |= qkv.resize(n * qkv_w);
    moved |= gu.resize(n * 2 * inter);
    moved |= logits_d.resize(size_t(logit_rows) * V);
    moved |= nll.resize(n);
    moved |= h.resize(n * hid);
    moved |= attn.resize(n * H * D);
    moved |= act.resize(n * inter);
    if (moved) drop_graph();  // the graph holds the old addresses
    const RopeTable rt = rope_table(cfg.rope(), cfg.rotary_embedding, cfg.max_position_embeddings, seq_len);
    inv_freq.resize(rt.inv_freq.size());
    TMKIT_CUDA_CHECK(cudaMemcpy(inv_freq.get(), rt.inv_freq.data(), rt.inv_freq.size() * 4, cudaMemcpyHostToDevice));
    rope_scaling = rt.attention_scaling;
  }

  void run(const int32_t* tokens, int64_t B64, int64_t T64, bool use_cache, bool nll_only) override {
    const int64_t V = cfg.vocab_size;
    if (B64 < 1 || T64 < 1) fail("a forward needs at least one token of one sequence ({} x {} given)", B64, T64);
    if (B64 > 65535 || B64 * T64 > (int64_t(1) << 24))
      fail("{} sequences x {} tokens are too many rows for one forward", B64, T64);
    const int B = int(B64), T_ = int(T64), rows = B * T_;
    for (int i = 0; i < rows; ++i)
      if (tokens[i] < 0 || tokens[i] >= V) {
        if (B == 1) fail("token id {} at position {} is outside the vocabulary [0, {})", tokens[i], i, V);
        fail("token id {} at position {} of sequence {} is outside the vocabulary [0, {})", tokens[i], i % T_, i / T_, V);
      }
    const int pos0 = use_cache ? int(cached) : 0;
    if (use_cache) {
      if (B != cache_batch) fail("KV cache: {} sequences given, reset() made room for {}", B, cache_batch);
      if (cached + T64 > capacity)
        fail("KV cache: {} cached + {} new tokens exceed the capacity {} given to reset()", cached, T64, capacity);
    }
    const std::string what = B > 1 ? fmt::format("a forward of {} sequences x {} tokens (fewer per batch: -b)", B, T_)
                                   : fmt::format("a forward of {} tokens", T_);
    // Decode steps replay one graph, unless the rotary table depends on the length (dynamic NTK).
    const bool graph = use_cache && T_ == 1 && cfg.rope().type != "dynamic";
    if (graph && !decode_graph) {
      prepare(rows, rows, capacity, what);
      // W4A16 dequantizes into w4_dense beyond its fused rows; nothing may be allocated while capturing.
      for (const Layer& l : layers)
        for (const auto* w4 : {&l.qkv4, &l.wo4, &l.w13_4, &l.w2_4})
          if (*w4) w4_dense.resize((*w4)->dense_elements(rows));
      cudaGraph_t g;
      TMKIT_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      enqueue(B, 1, 0, pos_d.get(), true, false);
      TMKIT_CUDA_CHECK(cudaStreamEndCapture(stream, &g));
      TMKIT_CUDA_CHECK(cudaGraphInstantiate(&decode_graph, g, 0));
      cudaGraphDestroy(g);
    }
    if (!graph) prepare(rows, nll_only ? std::min(rows, kLogitSlab) : rows, pos0 + T64, what);
    TMKIT_CUDA_CHECK(cudaMemcpyAsync(ids_d.get(), tokens, size_t(rows) * 4, cudaMemcpyHostToDevice, stream));
    if (graph) {
      TMKIT_CUDA_CHECK(cudaMemcpyAsync(pos_d.get(), &pos0, 4, cudaMemcpyHostToDevice, stream));
      TMKIT_CUDA_CHECK(cudaGraphLaunch(decode_graph, stream));
    } else {
      enqueue(B, T_, pos0, nullptr, use_cache, nll_only);
    }
    TMKIT_CUDA_CHECK(cudaStreamSynchronize(stream));  // the host values copied above must outlive the copies
    last_rows = nll_only ? 0 : rows;
    if (use_cache) cached += T64;
  }

  // The forward pass of B sequences of T tokens at positions pos0.. (or *pos_dev..), as kernels on
  // `stream`. Every GEMM sees all B T rows; attention runs per sequence (over the forward's own K/V,
  // or over the cache: the decode kernel for a few tokens, the prefill kernel for more).
  void enqueue(int B, int T_, int pos0, const int* pos_dev, bool use_cache, bool nll_only) {
    const int hid = int(cfg.hidden_units), H = int(cfg.head_num), KV = int(cfg.kv_head_num);
    const int D = int(cfg.size_per_head), V = int(cfg.vocab_size), qkv_w = (H + 2 * KV) * D, rows = B * T_;
    const float eps = float(cfg.norm_eps);
    const float scale = cfg.softmax_scale > 0 ? float(cfg.softmax_scale) : 1.0f / std::sqrt(float(D));
    const cudaStream_t s = stream;

    cuda::embedding<T>(ids_d.get(), rows, embed.get(), hid, x.get(), s);
    for (size_t li = 0; li < layers.size(); ++li) {
      Layer& l = layers[li];
      const int I = int(cfg.inter_size[li]);
      cuda::add_rmsnorm<T>(x.get(), li ? delta.get() : nullptr, nullptr, l.attn_norm.get(), eps, rows, hid, h.get(), s);
      linear(h.get(), l.wqkv, l.qkv4, qkv.get(), rows, hid, qkv_w);
      cuda::bias_rope<T>(qkv.get(), l.bqkv.size() ? l.bqkv.get() : nullptr, inv_freq.get(), rope_scaling, B, T_, H, KV,
                         D, int(cfg.rotary_embedding), pos0, pos_dev, s);
      if (use_cache) {  // K and V enter the cache in its format; attention reads them back from there
        const cuda::KvLayer c = cache.layer(int(li));
        cuda::kv_append(qkv.get(), B, T_, H, c, pos0, pos_dev, s);
        if (T_ <= cuda::kDecodeMaxTokens)
          cuda::attention_decode<T>(qkv.get(), size_t(qkv_w), c, B, T_, pos0, pos_dev, H, KV, D, scale,
                                    decode_scratch.get(), attn.get(), s);
        else
          cuda::attention_prefill<T>(qkv.get(), size_t(qkv_w), c, B, T_, pos0, pos_dev, H, KV, D, scale, attn.get(), s);
      } else {  // the same values as the cache would give back, in place
        cuda::kv_fake_quant(qkv.get(), rows, H, KV, D, kv_bits(kv), s);
        cuda::attention_prefill<T>(qkv.get(), size_t(qkv_w), qkv.get() + size_t(H) * D, qkv.get() + size_t(H + KV) * D,
                                   size_t(qkv_w), B, T_, H, KV, D, scale, attn.get(), s);
      }
      linear(attn.get(), l.wo, l.wo4, delta.get(), rows, H * D, hid);
      cuda::add_rmsnorm<T>(x.get(), delta.get(), l.bo.size() ? l.bo.get() : nullptr, l.ffn_norm.get(), eps, rows, hid,
                           h.get(), s);
      linear(h.get(), l.w13, l.w13_4, gu.get(), rows, hid, 2 * I);
      cuda::silu_mul<T>(gu.get(), rows, I, act.get(), s);
      linear(act.get(), l.w2, l.w2_4, delta.get(), rows, I, hid);
    }
    cuda::add_rmsnorm<T>(x.get(), delta.get(), nullptr, norm.get(), eps, rows, hid, h.get(), s);
    if (!nll_only) {
      gemm(h.get(), output.get(), logits_d.get(), rows, hid, V, /*w_transposed=*/true);  // output is [V_pad, hid]
      return;
    }
    // Row r's target is ids[r + 1] (rows b T + T - 1 get the next sequence's first id: ignored).
    for (int r0 = 0; r0 < rows - 1; r0 += kLogitSlab) {
      const int n = std::min(kLogitSlab, rows - r0);
      gemm(h.get() + size_t(r0) * hid, output.get(), logits_d.get(), n, hid, V, /*w_transposed=*/true);
      cuda::nll_rows(logits_d.get(), V, V, ids_d.get() + r0 + 1, std::min(n, rows - 1 - r0), nll.get() + r0, s);
    }
  }
  const float* logits() const override { return logits_d.get(); }
};

}  // namespace

void gpu_start_context() {
  static std::thread starter([] { cudaFree(nullptr); });
  static struct Joiner {
    ~Joiner() { if (starter.joinable()) starter.join(); }
  } joiner;
}

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

Mat GpuModel::forward(const int32_t* tokens, int64_t T) { return forward_batch(tokens, 1, T); }

Mat GpuModel::forward_batch(const int32_t* tokens, int64_t batch, int64_t T) {
  impl_->run(tokens, batch, T, /*use_cache=*/false, /*nll_only=*/false);
  return last_logits();
}

void GpuModel::reset(int64_t capacity, int64_t batch) { impl_->reset(capacity, batch); }
void GpuModel::append(const int32_t* tokens, int64_t T) {
  if (impl_->cache_batch == 0) fail("KV cache: append() before reset()");
  impl_->run(tokens, impl_->cache_batch, T, /*use_cache=*/true, /*nll_only=*/false);
}
int64_t GpuModel::position() const { return impl_->cached; }
int64_t GpuModel::batch() const { return impl_->cache_batch; }
size_t GpuModel::kv_cache_bytes() const { return impl_->cache_bytes(); }
void GpuModel::synchronize() const { TMKIT_CUDA_CHECK(cudaDeviceSynchronize()); }

Mat GpuModel::last_logits() const {
  Mat logits(impl_->last_rows, impl_->cfg.vocab_size);
  TMKIT_CUDA_CHECK(cudaMemcpy(logits.data(), impl_->logits(), size_t(logits.size()) * 4, cudaMemcpyDeviceToHost));
  return logits;
}

void GpuModel::nll_sums(const int32_t* tokens, int64_t T, double* sum, double* sum_sq) {
  nll_sums_batch(tokens, 1, T, sum, sum_sq);
}

void GpuModel::nll_sums_batch(const int32_t* tokens, int64_t batch, int64_t T, double* sums, double* sums_sq) {
  impl_->run(tokens, batch, T, /*use_cache=*/false, /*nll_only=*/true);
  std::vector<float> nll(size_t(batch * T - 1));
  TMKIT_CUDA_CHECK(cudaMemcpy(nll.data(), impl_->nll.get(), nll.size() * 4, cudaMemcpyDeviceToHost));
  for (int64_t b = 0; b < batch; ++b) {
    sums[b] = sums_sq[b] = 0.0;
    for (int64_t t = 0; t + 1 < T; ++t) {  // row b T + t scores token t + 1 of sequence b
      const double v = nll[size_t(b * T + t)];
      sums[b] += v;
      sums_sq[b] += v * v;
    }
  }
}

}  // namespace tmkit
