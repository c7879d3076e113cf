// Launchers of tmkit's CUDA kernels (one kernel per .cu file beside this header). T is the
// workspace's element type, __half or __nv_bfloat16. Activations between kernels are row-major
// [tokens, features]; the residual stream and GEMM outputs are fp32 (see gpu_model.cu for why).
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda_utils.h"
#include "kv_cache.h"
#include "staged_x.cuh"

namespace tmkit::cuda {

// x[t, :] = float(table[ids[t], :]) for t < T.
template <typename T>
void embedding(const int32_t* ids, int T_, const T* table, int hidden, float* x, cudaStream_t s);

// x += delta (+ bias) when delta is given; then y = x / rms(x) * w (in T). One row per block.
// `staged`: y in the order of the wgmma GEMM's input (staged_x.cuh; hidden % 128 == 0, y holds
// staged_rows(T_) rows), for an int4 linear that takes it (W4Linear::takes_staged).
template <typename T>
void add_rmsnorm(float* x, const float* delta, const T* bias, const T* w, float eps, int T_, int hidden, T* y,
                 cudaStream_t s, bool staged = false);

// qkv [B T, (H + 2KV) * D] in fp32 (B sequences of T tokens): adds the bias (if any) to q, k and v,
// then rotates the first `rot` channels of every q and k head in adjacent pairs (2j, 2j+1) by
// position * inv_freq[j]. Row b T + t of the buffer sits at position pos0 + t.
// pos_dev, when given, holds pos0 in device memory (for CUDA graphs replayed at every position).
// kv_static, when given, holds one layer's static KV parameters [k_scale | k_zero | v_scale | v_zero]
// (KV D floats each, ../kv_quant.h): K (before the rotation) and V are quantized to `kv_bits` and
// back on the way, exactly as kv_static_fake_quant.
template <typename T>
void bias_rope(float* qkv, const T* bias, const float* inv_freq, float rope_scale, int B, int T_, int H, int KV, int D,
               int rot, int pos0, const int* pos_dev, cudaStream_t s, const float* kv_static = nullptr, int kv_bits = 8);

// KV statistics (formats/kv_stats.h) of rows [T, (H + 2KV) D] of qkv, folded into stats
// [9][KV D] (K after RoPE, K before it, V; min, max, absmax each). `pre_rope`: the buffer holds
// q/k/v before bias_rope (bias added here, as bias_rope adds it): K before RoPE and V are folded;
// otherwise K (after RoPE). Order-independent, so deterministic.
template <typename T>
void kv_stats(const float* qkv, const T* bias, int rows, int H, int KV, int D, bool pre_rope, float* stats, cudaStream_t s);
void kv_stats_init(float* stats, int KV, int D, cudaStream_t s);
// Pass two (formats/kv_stats.h, KvHistograms): rows of qkv before bias_rope (bias added here) counted
// into counts [2 KV D][kHistBins] (K before RoPE, then V) over ranges [lo: 2 KV D | hi: 2 KV D].
constexpr int kHistBins = 256;  // KvHistograms::kBins
template <typename T>
void kv_histogram(const float* qkv, const T* bias, int rows, int H, int KV, int D, const float* ranges, unsigned* counts,
                  cudaStream_t s);

// K and V heads of qkv [T, (H + 2KV) D] as the KV cache would give them back (../kv_quant.h): `bits`
// 8 or 4 quantize and dequantize per token and kv head, 16 rounds to fp16.
void kv_fake_quant(float* qkv, int T_, int H, int KV, int D, int bits, cudaStream_t s);

// out[t, c] = silu(gate c) * (up c) for the rows of gu [T, 2I]: gu = [gate | up], or, with
// `interleaved`, blocks of 8 gate columns each followed by the same 8 up columns
// (interleave_gate_up in gpu_rank.cc: the order GemvOut::act reads). `staged`: as add_rmsnorm's.
template <typename T>
void silu_mul(const float* gu, int T_, int I, bool interleaved, T* out, cudaStream_t s, bool staged = false);

// Where a decode GEMV (dense_gemv, w4a16_stream) puts its fp32 sums S[M, N] = x W: in y, or, for
// the gate/up linear, as act[M, N / 2] = silu(gate) * up in T, W's columns being
// [8 gate | the same 8 up] blocks (then the block that sums a gate column sums its up column too,
// and the SiLU step needs no kernel of its own).
//
// A decode step's RMSNorm can also fold across the boundary between two GEMVs (w4a16_stream and
// dense_gemv, at most kFoldMaxRows rows; gpu_rank.cc's folds_norm): the GEMV that ends an
// attention or MLP block (wo, w2; `residual` set) adds its sums (+ bias) into the fp32 residual stream, writes
// xw = T(x * norm_w) and, per block b, the block's share ss[m * kFoldMaxParts + b] of the sum of
// x's squares of row m; the GEMV that reads xw (qkv, w13; `fold_in` set) multiplies its sums by
// 1 / rms(x) = rsqrt(sum_b ss / K + eps). No norm kernel runs between them. xw is unnormalized,
// so it carries x's range: x * norm_w within fp16 (as the residual stream itself must be in any
// fp16 forward, the references' included).
constexpr int kFoldMaxRows = 4, kFoldMaxParts = 512;
struct FoldIn {
  const float* ss = nullptr;  // the producer's partials
  int parts = 0;              // how many per row (the producer's launch returns it)
  float eps = 0.0f;
};
template <typename T>
struct GemvOut {
  GemvOut(float* plain = nullptr) : y(plain) {}  // NOLINT: a float* is the plain output
  float* y = nullptr;
  T* act = nullptr;
  // The fold's first half (instead of y and act).
  float* residual = nullptr;
  const T* bias = nullptr;    // or none
  const T* norm_w = nullptr;  // the next RMSNorm's weight [N]
  T* xw = nullptr;            // [M, N]
  float* ss = nullptr;        // [kFoldMaxRows][kFoldMaxParts]
  // The fold's second half (with y or act).
  FoldIn fold_in;
};
// std::type_identity_t (the CUDA files build as C++17): T comes from the other arguments, and a
// plain float* converts to a GemvOut.
template <typename T>
using NoDeduce = typename std::enable_if<true, T>::type;

// Causal GQA attention of B sequences of T queries into out [B T, H D] (row b T + t); never
// materializes the [T, T] scores (attention_prefill.cu). Queries: fp32 rows b T + t of q (stride
// q_stride, head h at h D), after bias and RoPE.
// `staged`: out in the order of the wgmma GEMM's input, as add_rmsnorm's (H D % 128 == 0).
// Over the forward's own keys (positions 0 .. T - 1): k/v rows b T + t of stride kv_stride.
template <typename T>
void attention_prefill(const float* q, size_t q_stride, const float* k, const float* v, size_t kv_stride, int B, int T_,
                       int H, int KV, int D, float scale, T* out, cudaStream_t s, bool staged = false);
// Over the KV cache (queries at positions pos0 .. pos0 + T - 1, keys 0 .. pos0 + T - 1, already
// appended); pos0 from pos_dev when given.
template <typename T>
void attention_prefill(const float* q, size_t q_stride, const KvLayer& cache, int B, int T_, int pos0,
                       const int* pos_dev, int H, int KV, int D, float scale, T* out, cudaStream_t s,
                       bool staged = false);

// W4A16 on tensor cores: y[M, N] (fp32) = x[M, K] (fp16) * W, W packed by w4_pack (layout:
// w4a16_common.cuh) with fp16 scales and integer zeros [K/128, N]; K % 128 == 0, N % 8 == 0.
// `variant` 0 or 1 picks one of two block shapes per row range (bench-kernels times both).
// w4a16_gemv: M <= 32, warps split K (w4a16_gemv.cu); w4a16_gemm: any M, tiles through shared
// memory (w4a16_gemm.cu); w4a16_stream and w4a16_wgmma below. W4Linear (../w4a16_linear.h) chooses between them.
void w4a16_gemv(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales, const __half* zeros,
                float* y, cudaStream_t s, int variant = 0);
void w4a16_gemm(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales, const __half* zeros,
                float* y, cudaStream_t s, int variant = 0);
// M <= 16, N % 16 == 0: the weights streamed through shared memory by a persistent grid
// (w4a16_stream.cu), scales and zeros as w4_pack_scale_zero orders them; `variant` 1: the
// other count of consumer warps, 2: two blocks of 4 stages per SM (bench-kernels' comparisons).
// Returns the blocks launched (with GemvOut::residual: the ss partials per row it wrote).
int w4a16_stream(const __half* x, int M, int K, int N, const uint32_t* packed, const uint32_t* scale_zero,
                 const GemvOut<__half>& out, cudaStream_t s, int variant = 0);
// Many rows on Hopper's wgmma (w4a16_wgmma.cu): N % 128 == 0, scales and zeros in w4a16_stream's
// order, x staged (staged_x.cuh: staged_rows(M) * K halves), by w4_stage_x or by the kernel that
// computed it.
void w4_stage_x(const __half* x, int M, int K, __half* staged, cudaStream_t s);
void w4a16_wgmma(const __half* staged, int M, int K, int N, const uint32_t* packed, const uint32_t* scale_zero, float* y,
                 cudaStream_t s);
// TurboMind v0.6 qweight [K, N/8] -> the packed layout (K * N / 8 words).
void w4_pack(const uint32_t* qweight, int K, int N, uint32_t* packed, cudaStream_t s);
// scales and zeros [K/128, N] -> w4a16_stream's order (K / 128 * N words); N % 16 == 0.
void w4_pack_scale_zero(const __half* scales, const __half* zeros, int K, int N, uint32_t* scale_zero, cudaStream_t s);
// The packed int4 linear as dense fp16 w[K, N] (for the dense GEMM of long inputs).
void w4_dequant_packed(const uint32_t* packed, const __half* scales, const __half* zeros, int K, int N, __half* w,
                       cudaStream_t s);

// Dense y[M, N] (fp32) = x[M, K] * w[K, N] (row-major, the workspace's type) for decode steps,
// M <= kDenseGemvMaxRows, N % 8 == 0 (dense_gemv.cu; faster than cuBLAS there, and its weight reads
// start before the kernel ahead of it ends). `scratch`: dense_gemv_scratch_floats floats, zeroed
// once before its first use (it holds counters every call leaves at 0); calls may share it.
constexpr int kDenseGemvMaxRows = 4;
size_t dense_gemv_scratch_floats(int M, int K, int N);
// Returns its column tiles (with GemvOut::residual: the ss partials per row it wrote).
template <typename T>
int dense_gemv(const T* x, int M, int K, int N, const T* w, const NoDeduce<GemvOut<T>>& out, float* scratch,
               cudaStream_t s);

// nll[t] = logsumexp(logits[t, :V]) - logits[t, targets[t]] for t < rows (logits row stride ld).
void nll_rows(const float* logits, int ld, int V, const int32_t* targets, int rows, float* nll, cudaStream_t s);

// ---- Decode attention over the KV cache (attention_decode.cu) ----

// The most queries per sequence the decode kernel takes (decode steps are 1; a few more for
// speculative or chunked steps). Longer inputs go to attention_prefill.
constexpr int kDecodeMaxTokens = 4;

// How the keys of a cache of `capacity` tokens are split: `chunks` blocks of `chunk` keys per
// (sequence, kv head). Depends on the capacity only, so a CUDA graph replays at every position.
struct DecodeSplit {
  int chunk = 0, chunks = 0;
};
DecodeSplit attention_decode_split(int capacity);
// Floats of scratch attention_decode needs for B sequences of T queries over `capacity` keys. The
// scratch must be zeroed once before its first use (it holds counters every call leaves at 0).
size_t attention_decode_scratch_floats(int B, int T_, int H, int D, int capacity);

// The same result as attention_prefill over the cache, for T <= kDecodeMaxTokens: split over keys
// (partials in `scratch`), then merged in a fixed order (deterministic). With `rope` (its
// inv_freq set), q is the qkv buffer as the qkv linear left it: the kernel adds the bias and
// rotates q itself and appends the new tokens' K and V to the cache first, as rope_append would
// (without writing qkv back), a kernel fewer per decode step.
template <typename T>
void attention_decode(const float* q, size_t q_stride, const KvLayer& cache, int B, int T_, int pos0, const int* pos_dev,
                      int H, int KV, int D, float scale, float* scratch, T* out, cudaStream_t s,
                      const QkvRope<T>& rope = {});

}  // namespace tmkit::cuda
