// The perplexity protocol of shared/reference/*/reference.json (llama.cpp's, without its
// half-context trick): non-overlapping chunks of `ctx` tokens, the last partial chunk dropped,
// every token but each chunk's first scored, ppl = exp(mean NLL) with llama.cpp's error estimate.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "file_io.h"
#include "model_weights.h"

namespace tmkit {

struct PplResult {
  double ppl = 0, ppl_error = 0, mean_nll = 0;
  int64_t chunks = 0, tokens = 0;  // tokens = scored tokens
  double seconds = 0;
};

// Scores one chunk: the sum and sum of squares of -log p(tokens[t] | tokens[<t]), t = 1..T-1.
using ChunkScorer = std::function<void(const int32_t* tokens, int64_t T, double* sum, double* sum_sq)>;
// Logits [T, V] of one sequence, for runtimes that hand logits back (the CPU oracle).
using ForwardFn = std::function<Mat(const int32_t* tokens, int64_t T)>;
ChunkScorer score_from_logits(ForwardFn forward);
using ChunkProgress = std::function<void(int64_t done, int64_t total, double running_ppl)>;

// Scores `count` consecutive chunks of T tokens at once (tokens holds count * T ids): sums[i] and
// sums_sq[i] as ChunkScorer's, for chunk i. For runtimes that batch chunks (the GPU).
using BatchScorer = std::function<void(const int32_t* tokens, int64_t count, int64_t T, double* sums, double* sums_sq)>;

// `max_chunks` <= 0: all chunks. `threads` workers score chunks in parallel (1 for a GPU); the
// result does not depend on the number of threads (per-chunk sums are added in chunk order).
PplResult perplexity(const ChunkScorer& score, const std::vector<int32_t>& tokens, int64_t ctx, int64_t max_chunks,
                     int threads, const ChunkProgress& progress = {});
// The same, `batch` chunks per call of `score` (the last call takes the rest); progress is still
// reported per chunk, in chunk order within a batch.
PplResult perplexity_batched(const BatchScorer& score, int64_t batch, const std::vector<int32_t>& tokens, int64_t ctx,
                             int64_t max_chunks, int threads, const ChunkProgress& progress = {});

// Sum of -log softmax(logits[t])[targets[t]] and of its square, over rows t, in double.
void nll_sums(const Mat& logits, const int32_t* targets, int64_t rows, double* sum, double* sum_sq);

// int32 little-endian token ids; every id must be in [0, vocab).
std::vector<int32_t> read_tokens(const fs::path& path, int64_t vocab);

}  // namespace tmkit
