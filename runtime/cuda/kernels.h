// Launchers of tmkit's CUDA kernels (one kernel per .cu file beside this header). T is the
// workspace's element type, __half or __nv_bfloat16. Activations between kernels are row-major
// [tokens, features]; the residual stream and GEMM outputs are fp32 (see gpu_model.cu for why).
#pragma once
#include <cstdint>

#include "cuda_utils.h"

namespace tmkit::cuda {

// x[t, :] = float(table[ids[t], :]) for t < T.
template <typename T>
void embedding(const int32_t* ids, int T_, const T* table, int hidden, float* x, cudaStream_t s);

// x += delta (+ bias) when delta is given; then y = x / rms(x) * w (in T). One row per block.
template <typename T>
void add_rmsnorm(float* x, const float* delta, const T* bias, const T* w, float eps, int T_, int hidden, T* y,
                 cudaStream_t s);

// qkv [T, (H + 2KV) * D] in fp32: adds the bias (if any) to q, k and v, then rotates the first
// `rot` channels of every q and k head in adjacent pairs (2j, 2j+1) by position * inv_freq[j].
// Token t of the buffer sits at position pos0 + t.
// pos_dev, when given, holds pos0 in device memory (for CUDA graphs replayed at every position).
template <typename T>
void bias_rope(float* qkv, const T* bias, const float* inv_freq, float rope_scale, int T_, int H, int KV, int D,
               int rot, int pos0, const int* pos_dev, cudaStream_t s);

// K and V heads of qkv quantized to `bits` and back, per token and kv head (../kv_quant.h).
void kv_fake_quant(float* qkv, int T_, int H, int KV, int D, int bits, cudaStream_t s);

// out[t, c] = silu(gu[t, c]) * gu[t, I + c] for gu = [gate | up] of width 2I.
template <typename T>
void silu_mul(const float* gu, int T_, int I, T* out, cudaStream_t s);

// Causal GQA attention of T queries at positions pos0 .. pos0 + T - 1 over keys/values 0 ..
// pos0 + T - 1 (fp32, after bias and RoPE; q rows of stride q_stride, k/v rows of stride
// kv_stride) into out [T, H * D]; never materializes the [T, T] scores.
template <typename T>
void attention_prefill(const float* q, size_t q_stride, const float* k, const float* v, size_t kv_stride, int T_,
                       int pos0, const int* pos_dev, int H, int KV, int D, float scale, T* out, cudaStream_t s);

// K and V rows of qkv [T, (H + 2 KV) D] into rows pos0 .. pos0 + T - 1 of the caches [*, KV D].
void kv_append(const float* qkv, int T_, int H, int KV, int D, int pos0, const int* pos_dev, float* k_cache,
               float* v_cache, cudaStream_t s);

// W4A16 on tensor cores for M <= 128 rows (w4a16_mma.cu, which explains the packed layout):
// y[M, N] (fp32) = x[M, K] (fp16) * W, W packed by w4_pack with fp16 scales and integer zeros
// [K/128, N]. K % 128 == 0, N % 8 == 0. `variant` picks the column tiles per block (0: 8, 1: 16).
void w4a16_mma(const __half* x, int M, int K, int N, const uint32_t* packed, const __half* scales, const __half* zeros,
               float* y, cudaStream_t s, int variant = 0);
// TurboMind v0.6 qweight [K, N/8] -> the packed layout (K * N / 8 words).
void w4_pack(const uint32_t* qweight, int K, int N, uint32_t* packed, cudaStream_t s);
// The packed int4 linear as dense fp16 w[K, N] (for the dense GEMM of long inputs).
void w4_dequant_packed(const uint32_t* packed, const __half* scales, const __half* zeros, int K, int N, __half* w,
                       cudaStream_t s);

// nll[t] = logsumexp(logits[t, :V]) - logits[t, targets[t]] for t < rows (logits row stride ld).
void nll_rows(const float* logits, int ld, int V, const int32_t* targets, int rows, float* nll, cudaStream_t s);

}  // namespace tmkit::cuda
