// Loops over many independent, cheap items (converting or copying weights element by element) on
// every core: fn(begin, end) runs on contiguous chunks of [0, n), the calling thread taking one.
// Items of a chunk run in order on one thread; which thread runs which chunk does not change the
// result as long as the items are independent.
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace tmkit {

template <typename F>
void parallel_chunks(int64_t n, F&& fn, int64_t min_chunk = int64_t(1) << 16) {
  const int64_t most = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t threads = std::clamp<int64_t>(n / std::max<int64_t>(1, min_chunk), 1, most);
  if (threads == 1) return fn(int64_t(0), n);
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t)
    pool.emplace_back([&fn, t, chunk, n] { fn(t * chunk, std::min(n, (t + 1) * chunk)); });
  fn(int64_t(0), std::min(n, chunk));
  for (std::thread& t : pool) t.join();
}

}  // namespace tmkit
