// One rank of the GPU model (gpu_rank.h). Precision plan: the residual stream and every GEMM
// output are fp32; GEMM inputs (weights, normed activations, attention output, SiLU(gate)*up) are
// fp16 whenever every weight fits fp16's range, bf16 workspaces included (as the references'
// ppl_fp16 protocol, "fp16 weights and compute"). Measured on small-llama (bf16): bf16 GEMM inputs
// put the logits 4.4e-3 (rel. L2) off the fp32 reference, fp16 ones 1e-3 (2^-12 vs 2^-9
// rounding). A workspace with a weight beyond 65504 runs in bf16. Prefill attention runs on tensor
// cores with Q, K, V and the softmax weights in the same type (fp32 sums); decode attention reads
// K and V in fp32. Under tensor parallelism each rank sums `delta` over the ranks (NCCL
// all-reduce) after wo and after w2, and rank 0 alone runs the LM head. Decode steps at one rank
// fold the norms between GEMVs into them (HForm): the reading GEMV's input is then x * norm_w in
// fp16, its sums divided by the rms after the product.
#include "gpu_rank.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "cuda/kernels.h"
#include "parallel.h"
#include "rope.h"
#include "w4a16_linear.h"

namespace tmkit {

namespace {

using cuda::DeviceBuffer;

// Host fp32 -> device T (the values came from T files, so the conversion is exact). The host-side
// conversions and copies of a load run on every core (parallel.h): a 7B fp16 model's 6.7e9
// weights took over 90 s on one (H100 machine, session 18).
template <typename T>
DeviceBuffer<T> upload(const float* src, size_t n) {
  std::vector<uint16_t> bits(n);
  parallel_chunks(int64_t(n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      bits[size_t(i)] = std::is_same_v<T, __half> ? float_to_half(src[i]) : float_to_bf16(src[i]);
  });
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
  parallel_chunks(out.rows(), [&](int64_t r0, int64_t r1) {
    Eigen::Index c = 0;
    for (const Mat* p : parts) {
      out.block(r0, c, r1 - r0, p->cols()) = p->middleRows(r0, r1 - r0);
      c += p->cols();
    }
  }, 64);
  return out;
}

// w13's columns [gate I | up I] as blocks [8 gate | the same 8 up] (I % 8 == 0): then the block
// of a GEMV that sums a gate column sums its up column too, and writes SiLU(gate) * up itself
// (cuda::GemvOut::act); silu_mul reads the same order.
Mat interleave_gate_up(const Mat& w13) {
  const Eigen::Index I = w13.cols() / 2;
  Mat out(w13.rows(), w13.cols());
  parallel_chunks(w13.rows(), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (Eigen::Index b = 0; b < I / 8; ++b) {
        out.block(r, 16 * b, 1, 8) = w13.block(r, 8 * b, 1, 8);
        out.block(r, 16 * b + 8, 1, 8) = w13.block(r, I + 8 * b, 1, 8);
      }
  }, 64);
  return out;
}
Int4Linear interleave_gate_up(const Int4Linear& w13) {
  const int64_t I = w13.N / 2;
  std::vector<Int4Columns> parts;
  for (int64_t b = 0; b < I / 8; ++b) {
    parts.push_back({&w13, 8 * b, 8});
    parts.push_back({&w13, I + 8 * b, 8});
  }
  return concat_columns(parts);
}


// KV storage bits of a mode: fp16 stores halves.
int kv_bits(KvMode m) { return m == KvMode::kFp16 ? 16 : int(m); }

// Rows of the LM head per slab when only the NLL is wanted (ppl): bounds the logits buffer to
// kLogitSlab x vocab floats whatever the batch, at full GEMM efficiency.
constexpr int kLogitSlab = 2048;

template <typename T>
struct ImplT final : RankModel {
  struct Layer {
    DeviceBuffer<T> attn_norm, ffn_norm, wqkv, bqkv, wo, bo, w13, w2;
    std::unique_ptr<W4Linear> qkv4, wo4, w13_4, w2_4;  // int4 workspaces: these instead of the dense ones
    bool gate_up_interleaved = false;  // w13's columns (interleave_gate_up)
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
  DeviceBuffer<int> pos_d{1};
  DeviceBuffer<char> blas_workspace{32u << 20};
  cudaGraphExec_t decode_graph = nullptr;
  // TMKIT_DECODE_GRAPH=0 runs decode steps as plain launches (to compare, or should a graph fail).
  const bool graphs = cuda::switch_on("TMKIT_DECODE_GRAPH");
  float rope_scaling = 1.0f;
  struct Staged {  // what stage() left for launch()
    const int32_t* tokens = nullptr;
    int B = 0, tokens_per_seq = 0, pos0 = 0;
    bool graph = false, use_cache = false, nll_only = false;
  } st;

  void drop_graph() {
    if (decode_graph) cudaGraphExecDestroy(decode_graph);
    decode_graph = nullptr;
  }

  void reset(int64_t cap, int64_t batch) override {
    const int H = int(cfg.head_num), KV = int(cfg.kv_head_num), D = int(cfg.size_per_head);
    if (cap < 1) fail("KV cache: capacity {} must be at least 1 token", cap);
    if (batch < 1 || batch > 65535) fail("KV cache: batch {} is outside 1 .. 65535 sequences", batch);
    if (!kv_static.empty())
      fail("--kv-scales static: the KV cache (decode, tm-eval bench) stores online scales only; static scales are "
           "evaluated by forwards without a cache (tm-eval ppl)");
    bool moved = cache.allocate(kv_bits(kv), int(layers.size()), int(batch), KV, D, cap);
    const size_t scratch = cuda::attention_decode_scratch_floats(int(batch), cuda::kDecodeMaxTokens, H, D, int(cap));
    cuda::require_device_memory(scratch * 4, decode_scratch.size() * 4,
                                fmt::format("decode scratch for {} sequences x {} tokens", batch, cap));
    moved |= decode_scratch.resize(scratch);
    TMKIT_CUDA_CHECK(cudaMemset(decode_scratch.get(), 0, scratch * 4));  // attention_decode's counters start at 0
    // The graph holds the cache's addresses, its batch, and a grid sized by the capacity.
    if (moved || cap != capacity || batch != cache_batch) drop_graph();
    capacity = cap;
    cache_batch = batch;
    cached = 0;
  }
  size_t cache_bytes() const override { return capacity ? cache.bytes() : 0; }
  ImplT(const ModelWeights& w, KvMode kv_mode, int rank_) {
    cfg = w.cfg;
    kv = kv_mode;
    rank = rank_;
    embed = upload<T>(w.embed);
    output = upload<T>(w.output);
    norm = upload<T>(w.norm);
    for (const LayerWeights& lw : w.layers) {
      Layer l;
      l.attn_norm = upload<T>(lw.attn_norm);
      l.ffn_norm = upload<T>(lw.ffn_norm);
      l.gate_up_interleaved = cfg.inter_size[layers.size()] % 8 == 0;
      if (lw.qkv4) {
        l.qkv4 = std::make_unique<W4Linear>(*lw.qkv4);
        l.wo4 = std::make_unique<W4Linear>(*lw.wo4);
        l.w13_4 = std::make_unique<W4Linear>(l.gate_up_interleaved ? interleave_gate_up(*lw.w13_4) : *lw.w13_4);
        l.w2_4 = std::make_unique<W4Linear>(*lw.w2_4);
      } else {
        l.wqkv = upload<T>(hcat({&lw.wq, &lw.wk, &lw.wv}));
        l.wo = upload<T>(lw.wo);
        const Mat w13 = hcat({&lw.w1, &lw.w3});
        l.w13 = upload<T>(l.gate_up_interleaved ? interleave_gate_up(w13) : w13);
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
    size_t gemv_floats = 0;  // dense_gemv's scratch for the largest linear (shared by all: one at a time)
    const int hid = int(cfg.hidden_units), qd = int(cfg.head_num * cfg.size_per_head);
    const int qkv_w = int((cfg.head_num + 2 * cfg.kv_head_num) * cfg.size_per_head);
    for (size_t li = 0; li < layers.size(); ++li) {
      if (layers[li].qkv4) continue;
      const int I = int(cfg.inter_size[li]);
      for (auto [K, N] : {std::pair{hid, qkv_w}, std::pair{qd, hid}, std::pair{hid, 2 * I}, std::pair{I, hid}})
        gemv_floats = std::max(gemv_floats, cuda::dense_gemv_scratch_floats(cuda::kDenseGemvMaxRows, K, N));
    }
    if (gemv_floats) {
      gemv_scratch.resize(gemv_floats);
      TMKIT_CUDA_CHECK(cudaMemset(gemv_scratch.get(), 0, gemv_floats * 4));  // its counters start at 0
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
  // Decode steps' few rows go to dense_gemv (TMKIT_DENSE_GEMV=0: cuBLAS, for comparison), which
  // alone can write the gated activation (callers ask gemv_writes_act first).
  bool takes_dense_gemv(int M, int N) const { return M <= cuda::kDenseGemvMaxRows && N % 8 == 0 && dense_gemv_on; }
  // Returns dense_gemv's norm partials per row (GemvOut::residual), else 0.
  int gemm(const T* X, const T* W, const cuda::GemvOut<T>& out, int M, int K, int N, bool w_transposed = false) {
    if (!w_transposed && takes_dense_gemv(M, N))
      return cuda::dense_gemv<T>(X, M, K, N, W, out, gemv_scratch.get(), stream);
    if (out.act || out.residual || out.fold_in.ss)
      fail("internal: cuBLAS asked for the gated activation or a folded norm ({} rows)", M);
    float* Y = out.y;
    const float one = 1.0f, zero = 0.0f;
    constexpr cudaDataType_t t = cuda::TypeOf<T>::value;
    TMKIT_CUBLAS_CHECK(cublasGemmEx(blas, w_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, W, t,
                                    w_transposed ? K : N, X, t, K, &zero, Y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
    return 0;
  }

  const bool dense_gemv_on = cuda::switch_on("TMKIT_DENSE_GEMV");
  DeviceBuffer<float> gemv_scratch;  // dense_gemv's, for every dense linear of the model

  // A linear layer: the dense weight through cuBLAS, or the int4 one through W4A16. Returns the
  // norm partials per row that a folding GEMV wrote (GemvOut::residual), else 0.
  DeviceBuffer<__half> w4_scratch;
  int linear(const T* X, const DeviceBuffer<T>& W, const std::unique_ptr<W4Linear>& W4, const cuda::GemvOut<T>& out,
             int M, int K, int N, bool x_staged = false) {
    if (!W4) return gemm(X, W.get(), out, M, K, N);
    if constexpr (std::is_same_v<T, __half>)
      return W4->run(blas, X, M, out, w4_scratch, stream, W4Linear::Path::kAuto, x_staged);
    fail("int4 workspaces run with fp16 activations");
  }
  // Whether the kernel that computes the input of this int4 linear at M rows writes it in the
  // wgmma GEMM's order (cuda/staged_x.cuh), sparing the GEMM its staging kernel. TMKIT_STAGED_X=0
  // leaves that to the staging kernel, for comparison.
  const bool staged_x_on = cuda::switch_on("TMKIT_STAGED_X");
  bool stages_for(const W4Linear* W4, int M) const {
    return std::is_same_v<T, __half> && staged_x_on && W4 && W4->takes_staged(M);
  }
  // Whether the kernel of this linear at M rows writes the gated activation (GemvOut::act; decode
  // steps). TMKIT_GATED_GEMV=0 runs SiLU as a kernel of its own, for comparison.
  const bool gated_gemv_on = cuda::switch_on("TMKIT_GATED_GEMV");
  bool gemv_writes_act(const std::unique_ptr<W4Linear>& W4, int M, int N) const {
    if (!gated_gemv_on) return false;
    return W4 ? W4->streams(M) : takes_dense_gemv(M, N) && N % 16 == 0;
  }

  // Decode attention rotates and appends the new tokens itself (attention_decode's QkvRope);
  // TMKIT_ROPE_IN_ATTENTION=0 runs rope_append before it, for comparison.
  const bool rope_in_attention_on = cuda::switch_on("TMKIT_ROPE_IN_ATTENTION");
  // What h holds for the linear that reads it: rmsnorm(x) * norm_w, in the wgmma GEMM's order when
  // `staged`; or, with `fold` set, x * norm_w, which that linear's GEMV divides by the rms itself.
  struct HForm {
    bool staged = false;
    cuda::FoldIn fold;
  };
  // A decode step's norm between two GEMVs folds into them (cuda::GemvOut::residual and fold_in,
  // kernels.h): one kernel fewer per norm, two a layer. TMKIT_NORM_FOLD=0 runs add_rmsnorm between
  // them, for comparison. One rank only: under tensor parallelism the sums are partial until the
  // all-reduce.
  const bool norm_fold_on = cuda::switch_on("TMKIT_NORM_FOLD");
  DeviceBuffer<float> fold_ss{size_t(cuda::kFoldMaxRows) * cuda::kFoldMaxParts};
  bool gemv_folds(const std::unique_ptr<W4Linear>& W4, int M, int N) const {
    return W4 ? W4->streams(M) : takes_dense_gemv(M, N);
  }
  bool folds_norm(const std::unique_ptr<W4Linear>& W4, int M, int N, const std::unique_ptr<W4Linear>* next,
                  int next_N) const {
#ifdef TMKIT_HAVE_NCCL
    if (comm) return false;
#endif
    return norm_fold_on && next && M <= cuda::kFoldMaxRows && gemv_folds(W4, M, N) && gemv_folds(*next, M, next_N);
  }
  cuda::GemvOut<T> reading(const cuda::GemvOut<T>& out, const HForm& hf) const {
    cuda::GemvOut<T> o = out;
    o.fold_in = hf.fold;
    return o;
  }

  // x += X W (+ bias; the ranks' shares summed), then h = rmsnorm(x) * norm_w for `next`, the
  // linear that reads h (its int4 weight, if any, and its N; null: the output head).
  HForm residual_linear(const T* X, bool x_staged, const DeviceBuffer<T>& W, const std::unique_ptr<W4Linear>& W4, int M,
                        int K, int N, const T* bias, const T* norm_w, float eps, const std::unique_ptr<W4Linear>* next,
                        int next_N) {
    if (folds_norm(W4, M, N, next, next_N)) {
      cuda::GemvOut<T> out;
      out.residual = x.get();
      out.bias = bias;
      out.norm_w = norm_w;
      out.xw = h.get();
      out.ss = fold_ss.get();
      return {false, {fold_ss.get(), linear(X, W, W4, out, M, K, N, x_staged), eps}};
    }
    linear(X, W, W4, delta.get(), M, K, N, x_staged);
    all_reduce(delta.get(), size_t(M) * N);
    const bool staged = next && stages_for(next->get(), M);
    cuda::add_rmsnorm<T>(x.get(), delta.get(), bias, norm_w, eps, M, N, h.get(), stream, staged);
    return {staged, {}};
  }
  // act = SiLU(h W1) * (h W3), in the GEMV where it can. Returns whether act is staged for w2.
  bool gated_linear(const Layer& l, int M, int K, int I, const HForm& hf) {
    if (l.gate_up_interleaved && gemv_writes_act(l.w13_4, M, 2 * I)) {
      cuda::GemvOut<T> out;
      out.act = act.get();
      linear(h.get(), l.w13, l.w13_4, reading(out, hf), M, K, 2 * I, hf.staged);
      return false;
    }
    linear(h.get(), l.w13, l.w13_4, reading(gu.get(), hf), M, K, 2 * I, hf.staged);
    const bool staged = stages_for(l.w2_4.get(), M);
    cuda::silu_mul<T>(gu.get(), M, I, l.gate_up_interleaved, act.get(), stream, staged);
    return staged;
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
    moved |= h.resize(cuda::staged_rows(rows) * hid);  // staged (stages_for) in whole blocks of 8 rows
    moved |= attn.resize(cuda::staged_rows(rows) * H * D);
    moved |= act.resize(cuda::staged_rows(rows) * inter);
    if (moved) drop_graph();  // the graph holds the old addresses
    const RopeTable rt = rope_table(cfg.rope(), cfg.rotary_embedding, cfg.max_position_embeddings, seq_len);
    inv_freq.resize(rt.inv_freq.size());
    TMKIT_CUDA_CHECK(cudaMemcpy(inv_freq.get(), rt.inv_freq.data(), rt.inv_freq.size() * 4, cudaMemcpyHostToDevice));
    rope_scaling = rt.attention_scaling;
  }

  // Sums `delta` over the ranks in place (each holds its heads' or its inter slice's share).
  void all_reduce(float* x, size_t n) {
#ifdef TMKIT_HAVE_NCCL
    if (comm) TMKIT_NCCL_CHECK(ncclAllReduce(x, x, n, ncclFloat32, ncclSum, comm, stream));
#else
    (void)x, (void)n;
#endif
  }
  void warm_up() override {
    DeviceBuffer<float> one(1);
    TMKIT_CUDA_CHECK(cudaMemsetAsync(one.get(), 0, 4, stream));
    all_reduce(one.get(), 1);
    TMKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  void stage(const int32_t* tokens, int64_t B64, int64_t T64, bool use_cache, bool nll_only) override {
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
    const bool graph = graphs && use_cache && T_ == 1 && cfg.rope().type != "dynamic";
    if (graph && !decode_graph) {
      prepare(rows, rank ? 0 : rows, capacity, what);
      // W4A16's scratch (W4Linear::run); nothing may be allocated while capturing.
      for (const Layer& l : layers)
        for (const auto* w4 : {&l.qkv4, &l.wo4, &l.w13_4, &l.w2_4})
          if (*w4) w4_scratch.resize((*w4)->scratch_elements(rows));
      cudaGraph_t g = nullptr;
      TMKIT_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      std::string error;
      try {
        enqueue(B, 1, 0, pos_d.get(), true, false);
      } catch (const std::exception& e) {
        error = e.what();
      }
      const cudaError_t end = cudaStreamEndCapture(stream, &g);  // leaves the stream usable whatever happened
      if (error.empty() && end != cudaSuccess) error = cudaGetErrorString(end);
      if (!error.empty()) {
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();
        fail("capturing the decode step as a CUDA graph: {} (TMKIT_DECODE_GRAPH=0 runs it without one)", error);
      }
      TMKIT_CUDA_CHECK(cudaGraphInstantiate(&decode_graph, g, 0));
      cudaGraphDestroy(g);
    }
    if (!graph) prepare(rows, rank ? 0 : nll_only ? std::min(rows, kLogitSlab) : rows, pos0 + T64, what);
    st = {tokens, B, T_, pos0, graph, use_cache, nll_only};
  }

  void launch() override {
    const int rows = st.B * st.tokens_per_seq;
    TMKIT_CUDA_CHECK(cudaMemcpyAsync(ids_d.get(), st.tokens, size_t(rows) * 4, cudaMemcpyHostToDevice, stream));
    if (st.graph) {
      TMKIT_CUDA_CHECK(cudaMemcpyAsync(pos_d.get(), &st.pos0, 4, cudaMemcpyHostToDevice, stream));
      TMKIT_CUDA_CHECK(cudaGraphLaunch(decode_graph, stream));
    } else {
      enqueue(st.B, st.tokens_per_seq, st.pos0, nullptr, st.use_cache, st.nll_only);
    }
  }
  void finish() override {  // the stream is done (the host values copied by launch() lived until then)
    const int rows = st.B * st.tokens_per_seq;
    last_rows = st.nll_only ? 0 : rows;
    if (st.use_cache) cached += st.tokens_per_seq;
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
    // Each layer leaves h = the next norm of the residual stream x: the next layer's attn_norm, or
    // after the last layer the final norm.
    HForm hf{!layers.empty() && stages_for(layers[0].qkv4.get(), rows), {}};
    cuda::add_rmsnorm<T>(x.get(), nullptr, nullptr, layers.empty() ? norm.get() : layers[0].attn_norm.get(), eps, rows,
                         hid, h.get(), s, hf.staged);
    for (size_t li = 0; li < layers.size(); ++li) {
      Layer& l = layers[li];
      const int I = int(cfg.inter_size[li]);
      linear(h.get(), l.wqkv, l.qkv4, reading(qkv.get(), hf), rows, hid, qkv_w, hf.staged);
      float* stats = collect_kv_stats ? kv_stats_d.get() + li * 9 * size_t(KV * D) : nullptr;
      if (stats) cuda::kv_stats<T>(qkv.get(), l.bqkv.size() ? l.bqkv.get() : nullptr, rows, H, KV, D, true, stats, s);
      if (collect_kv_hist)
        cuda::kv_histogram<T>(qkv.get(), l.bqkv.size() ? l.bqkv.get() : nullptr, rows, H, KV, D,
                              kv_hist_ranges.get() + li * 4 * size_t(KV * D),
                              kv_hist_d.get() + li * 2 * size_t(KV * D) * cuda::kHistBins, s);
      const float* static_kv = kv_static.empty() ? nullptr : kv_static[li].get();  // reset() refuses it with a cache
      const T* bias = l.bqkv.size() ? l.bqkv.get() : nullptr;
      const int rot = int(cfg.rotary_embedding);
      const cuda::KvLayer c = use_cache ? cache.layer(int(li)) : cuda::KvLayer{};
      const cuda::QkvRope<T> rope{bias, inv_freq.get(), rope_scaling, rot};
      // The decode kernel rotates and appends itself (TMKIT_ROPE_IN_ATTENTION=0: rope_append does).
      const bool decode = use_cache && T_ <= cuda::kDecodeMaxTokens;
      const bool rope_in_attention = decode && rope_in_attention_on && rope.inv_freq;  // else rope_append says why not
      if (use_cache && !rope_in_attention)  // K and V enter the cache in its format; attention reads them from there
        cuda::rope_append<T>(qkv.get(), rope, B, T_, H, c, pos0, pos_dev, s);
      else if (!use_cache)
        cuda::bias_rope<T>(qkv.get(), bias, inv_freq.get(), rope_scaling, B, T_, H, KV, D, rot, pos0, pos_dev, s,
                           static_kv, kv_bits(kv));
      if (stats) cuda::kv_stats<T>(qkv.get(), static_cast<const T*>(nullptr), rows, H, KV, D, false, stats, s);
      // The decode kernel writes attn row-major; the prefill one staged where wo takes it.
      const bool attn_staged = !decode && stages_for(l.wo4.get(), rows);
      if (decode)
        cuda::attention_decode<T>(qkv.get(), size_t(qkv_w), c, B, T_, pos0, pos_dev, H, KV, D, scale,
                                  decode_scratch.get(), attn.get(), s, rope_in_attention ? rope : cuda::QkvRope<T>{});
      else if (use_cache)
        cuda::attention_prefill<T>(qkv.get(), size_t(qkv_w), c, B, T_, pos0, pos_dev, H, KV, D, scale, attn.get(), s,
                                   attn_staged);
      else {  // the same values as the cache would give back, in place
        if (!static_kv) cuda::kv_fake_quant(qkv.get(), rows, H, KV, D, kv_bits(kv), s);  // else done in bias_rope
        cuda::attention_prefill<T>(qkv.get(), size_t(qkv_w), qkv.get() + size_t(H) * D, qkv.get() + size_t(H + KV) * D,
                                   size_t(qkv_w), B, T_, H, KV, D, scale, attn.get(), s, attn_staged);
      }
      // The wo bias is added after the all-reduce, on every rank.
      hf = residual_linear(attn.get(), attn_staged, l.wo, l.wo4, rows, H * D, hid, l.bo.size() ? l.bo.get() : nullptr,
                           l.ffn_norm.get(), eps, &l.w13_4, 2 * I);
      const bool act_staged = gated_linear(l, rows, hid, I, hf);
      const bool last = li + 1 == layers.size();
      hf = residual_linear(act.get(), act_staged, l.w2, l.w2_4, rows, I, hid, nullptr,
                           last ? norm.get() : layers[li + 1].attn_norm.get(), eps, last ? nullptr : &layers[li + 1].qkv4,
                           qkv_w);
    }
    if (rank > 0) return;  // the ranks' residual streams are equal: rank 0 alone runs the head
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

std::unique_ptr<RankModel> make_rank_model(const ModelWeights& w, KvMode kv, int rank, bool fp16) {
  if (fp16) return std::make_unique<ImplT<__half>>(w, kv, rank);
  return std::make_unique<ImplT<__nv_bfloat16>>(w, kv, rank);
}

}  // namespace tmkit
