// One persistent host thread per tensor-parallel rank: run(job) calls job(r) on worker r for
// every r at once and returns when all are done, rethrowing the lowest rank's exception. Decode
// steps take a millisecond or less, so the threads stay (no spawn per call). Threads matter to
// CUDA: each keeps its own current device, and NCCL's single-process model wants one thread per
// device so that the ranks' collectives meet.
#pragma once
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tmkit {

class RankWorkers {
 public:
  explicit RankWorkers(int n) : errors_(size_t(n)) {
    for (int r = 0; r < n; ++r) threads_.emplace_back([this, r] { loop(r); });
  }
  ~RankWorkers() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    start_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  RankWorkers(const RankWorkers&) = delete;
  RankWorkers& operator=(const RankWorkers&) = delete;

  int size() const { return int(threads_.size()); }

  // job(r) on every worker, or on worker `only` alone (only >= 0).
  void run(const std::function<void(int)>& job, int only = -1) {
    std::unique_lock<std::mutex> lock(mu_);
    job_ = &job;
    only_ = only;
    pending_ = only >= 0 ? 1 : size();
    for (auto& e : errors_) e = nullptr;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
    for (auto& e : errors_)
      if (e) std::rethrow_exception(e);
  }

 private:
  void loop(int r) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (only_ >= 0 && only_ != r) continue;
      const std::function<void(int)>* job = job_;
      lock.unlock();
      std::exception_ptr err;
      try {
        (*job)(r);
      } catch (...) {
        err = std::current_exception();
      }
      lock.lock();
      errors_[size_t(r)] = err;
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex mu_;
  std::condition_variable start_, done_;
  const std::function<void(int)>* job_ = nullptr;
  int only_ = -1, pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::vector<std::exception_ptr> errors_;
  std::vector<std::thread> threads_;
};

}  // namespace tmkit
