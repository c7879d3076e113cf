#include "progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>

namespace tmkit {

Progress::Progress(std::string label, std::string unit, bool enabled)
    : label_(std::move(label)), unit_(std::move(unit)), enabled_(enabled), tty_(::isatty(2) == 1),
      start_(std::chrono::steady_clock::now()), last_print_(start_) {}

void Progress::update(int64_t step, int64_t steps, double amount, double total, const std::string& what) {
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  const double secs = std::chrono::duration<double>(now - start_).count();
  if (tty_ && step < steps && now - last_print_ < std::chrono::milliseconds(100)) return;
  last_print_ = now;
  const double rate = secs > 0 ? amount / secs : 0.0;
  const double eta = rate > 0 ? (total - amount) / rate : 0.0;
  std::string rate_text = unit_ == "B" ? fmt::format("{:.1f} MB/s", rate / 1e6) : fmt::format("{:.1f} {}/s", rate, unit_);
  std::string line = fmt::format("{}: [{}/{}] {:5.1f}%  {}  ETA {:.0f}s  {}", label_, step, steps,
                                 total > 0 ? 100.0 * amount / total : 100.0, rate_text, eta, what);
  if (tty_) {
    fmt::print(stderr, "\r\033[K{}", line);
    dirty_ = true;
  } else {
    fmt::print(stderr, "{}\n", line);
  }
  std::fflush(stderr);
}

void Progress::finish() {
  if (dirty_) fmt::print(stderr, "\n");
  dirty_ = false;
}

}  // namespace tmkit
