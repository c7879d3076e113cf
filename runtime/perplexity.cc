#include "perplexity.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <thread>

#include <cstring>

#include "error.h"

namespace tmkit {

void nll_sums(const Mat& logits, const int32_t* targets, int64_t rows, double* sum, double* sum_sq) {
  *sum = *sum_sq = 0.0;
  for (int64_t t = 0; t < rows; ++t) {
    const auto row = logits.row(t);
    const double m = row.maxCoeff();
    double z = 0.0;
    for (int64_t j = 0; j < row.size(); ++j) z += std::exp(double(row(j)) - m);
    const double nll = m + std::log(z) - double(row(targets[t]));
    *sum += nll;
    *sum_sq += nll * nll;
  }
}

ChunkScorer score_from_logits(ForwardFn forward) {
  return [forward = std::move(forward)](const int32_t* tokens, int64_t T, double* sum, double* sum_sq) {
    nll_sums(forward(tokens, T), tokens + 1, T - 1, sum, sum_sq);
  };
}

PplResult perplexity(const ChunkScorer& score, const std::vector<int32_t>& tokens, int64_t ctx, int64_t max_chunks,
                     int threads, const ChunkProgress& progress) {
  auto one_by_one = [&score](const int32_t* t, int64_t count, int64_t T, double* sums, double* sums_sq) {
    for (int64_t i = 0; i < count; ++i) score(t + i * T, T, sums + i, sums_sq + i);
  };
  return perplexity_batched(one_by_one, 1, tokens, ctx, max_chunks, threads, progress);
}

PplResult perplexity_batched(const BatchScorer& score, int64_t batch, const std::vector<int32_t>& tokens, int64_t ctx,
                             int64_t max_chunks, int threads, const ChunkProgress& progress) {
  if (ctx < 2) fail("-c: context {} is too small (at least 2 tokens)", ctx);
  if (batch < 1) fail("-b: {} chunks per batch; at least 1", batch);
  const int64_t available = int64_t(tokens.size()) / ctx;
  if (available == 0) fail("-c: {} tokens are fewer than one chunk of {}", tokens.size(), ctx);
  const int64_t n = max_chunks > 0 ? std::min(max_chunks, available) : available;
  const auto t0 = std::chrono::steady_clock::now();

  std::vector<double> sums(static_cast<size_t>(n)), sums_sq(static_cast<size_t>(n));
  std::atomic<int64_t> next{0};
  std::mutex mu;
  int64_t done = 0;
  double done_sum = 0.0;
  std::exception_ptr error;
  auto worker = [&] {
    try {
      for (int64_t c; (c = next.fetch_add(batch)) < n;) {
        const int64_t count = std::min(batch, n - c);  // chunks c .. c + count - 1 are contiguous tokens
        score(tokens.data() + c * ctx, count, ctx, &sums[size_t(c)], &sums_sq[size_t(c)]);
        std::lock_guard<std::mutex> lock(mu);
        for (int64_t i = c; i < c + count; ++i) {
          ++done;
          done_sum += sums[size_t(i)];
          if (progress) progress(done, n, std::exp(done_sum / double(done * (ctx - 1))));
        }
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
      next.store(n);
    }
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < std::max(1, threads); ++i) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);

  PplResult r;
  r.chunks = n;
  r.tokens = n * (ctx - 1);
  double s = 0.0, s2 = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    s += sums[size_t(c)];
    s2 += sums_sq[size_t(c)];
  }
  r.mean_nll = s / double(r.tokens);
  r.ppl = std::exp(r.mean_nll);
  const double var = s2 / double(r.tokens) - r.mean_nll * r.mean_nll;
  r.ppl_error = var > 0 && r.tokens > 1 ? r.ppl * std::sqrt(var / double(r.tokens - 1)) : 0.0;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

std::vector<int32_t> read_tokens(const fs::path& path, int64_t vocab) {
  MappedFile f(path);
  if (f.size() % 4 != 0) fail("{}: {} bytes is not a whole number of int32 token ids", path.string(), f.size());
  std::vector<int32_t> ids(f.size() / 4);
  if (!ids.empty()) std::memcpy(ids.data(), f.data(), f.size());
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= vocab)
      fail("{}: token {} = {} is outside the model's vocabulary [0, {})", path.string(), i, ids[i], vocab);
  return ids;
}

}  // namespace tmkit
