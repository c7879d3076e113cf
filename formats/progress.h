// Progress on stderr for long-running tools: a rewritten line with rate and ETA when stderr is
// a terminal, one plain line per step otherwise (logs of CI jobs stay readable).
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace tmkit {

class Progress {
 public:
  // `unit` names what `amount` counts ("B" prints as MB/s, anything else as <unit>/s).
  Progress(std::string label, std::string unit, bool enabled = true);
  void update(int64_t step, int64_t steps, double amount, double total, const std::string& what);
  void finish();

 private:
  std::string label_, unit_;
  bool enabled_, tty_, dirty_ = false;
  std::chrono::steady_clock::time_point start_, last_print_;
};

}  // namespace tmkit
