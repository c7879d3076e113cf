// Launchers of the AWQ search's own kernels (awq_kernels.cu); the layer's forward pass reuses the
// runtime's (../../runtime/cuda/kernels.h). Weights are fp32 masters W[rows, K] in the HF
// orientation (a row is an output channel, K its input channels), activations fp16 [T, K].
// Every reduction runs in a fixed order, so a search gives the same bytes on every run.
#pragma once
#include <cstdint>

#include "cuda/cuda_utils.h"

namespace tmkit::cuda {

// out[i] = fp16(in[i]).
void awq_to_half(const float* in, size_t n, __half* out, cudaStream_t s);
// x[i] += d[i].
void awq_add(float* x, const float* d, size_t n, cudaStream_t s);

// mean[c] = mean over the rows of |x[t, c]|, in fp32 (`partial`: awq_col_mean_partials(cols) floats).
size_t awq_col_mean_partials(int cols);
void awq_col_abs_mean(const __half* x, int rows, int cols, float* partial, float* mean, cudaStream_t s);

// The search's candidate weight (§1): out = fp16(Q(W * s) / s), Q the reference quantizer in fp16
// steps on groups of `group` columns (rtn.h); s may be null (plain Q).
void awq_fake_quant(const float* W, int rows, int K, const float* s, int group, __half* out, cudaStream_t s_);

// *loss = sum((a - b)^2) / n in double (`partial`: kSqDiffBlocks doubles).
constexpr int kSqDiffBlocks = 512;
void awq_mean_sq_diff(const float* a, const float* b, size_t n, double* partial, double* loss, cudaStream_t s);

// W[r, c] *= s[c]; W[r, c] /= s[r]; X[t, c] = fp16(X[t, c] / s[c]).
void awq_scale_cols(float* W, int rows, int cols, const float* s, cudaStream_t st);
void awq_unscale_rows(float* W, int rows, int cols, const float* s, cudaStream_t st);
void awq_unscale_cols(__half* X, int rows, int cols, const float* s, cudaStream_t st);

// Clip search (§3). Candidate i < steps clamps each (row, group) to ±max|w| (1 - i / n_grid):
// delta[i rows + r, k] = fp16(Q(clamp(W[r, k])) - W[r, k]), so that x·delta is the error of the
// quantized partial product directly (the reference subtracts the two products).
void awq_clip_deltas(const float* W, int rows, int K, int group, int steps, int n_grid, __half* delta, cudaStream_t s);
// err[b m + r] = mean over t < n_tok of C_b[t m + r]^2 for `batches` column-major C_b [m, n_tok]
// one after another (as a strided batched cuBLAS GEMM writes them).
void awq_sq_mean_cols(const float* C, int m, int n_tok, int batches, float* err, cudaStream_t s);
// Per (row r, group g): the first candidate with the strictly lowest err[g steps rows + i rows + r] clamps
// W's group; ratio[r groups + g] = chosen max / max|w| (1 for an all-zero group).
void awq_clip_apply(float* W, int rows, int K, int group, int steps, int n_grid, const float* err, float* ratio,
                    cudaStream_t s);

// The final quantization (§4, the host's quantize_rtn bit for bit) of W's N output channels, packed
// as AwqPackedLinear (../../formats/int4.h): qweight [K, N/8] and qzeros [K/g, N/8] in the AWQ
// nibble order, scales [K/g, N]. HF output channel n is row n of W, or with pairs_D = D (q/k heads
// kept in RoPE pair order) the row holding it. Scratch: codes K N bytes, zero_codes K/g N bytes.
void awq_quantize_pack(const float* W, int N, int K, int group, int pairs_D, uint8_t* codes, uint8_t* zero_codes,
                       int32_t* qweight, int32_t* qzeros, __half* scales, cudaStream_t s);

// *flag = 1 if any value is NaN or Inf (left as it was otherwise).
void awq_flag_nonfinite(const float* x, size_t n, int* flag, cudaStream_t s);

}  // namespace tmkit::cuda
