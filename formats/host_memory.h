// How much host memory a tool may still take before the kernel (or the container's cgroup) says
// no: so that a run too large for the machine is refused up front, naming the flag that sized it,
// rather than dying in std::bad_alloc or the OOM killer halfway through.
#pragma once
#include <cstdint>
#include <fstream>
#include <string>

namespace tmkit {

// MemAvailable from /proc/meminfo, lowered to the cgroup v2 limit's headroom (memory.max -
// memory.current) where one applies; 0 when neither can be read (then callers do not check).
inline uint64_t host_available_bytes() {
  uint64_t avail = 0;
  std::ifstream meminfo("/proc/meminfo");
  for (std::string key; meminfo >> key;) {
    uint64_t kib = 0;
    meminfo >> kib;
    if (key == "MemAvailable:") {
      avail = kib * 1024;
      break;
    }
    meminfo.ignore(256, '\n');
  }
  uint64_t limit = 0, used = 0;  // memory.max reads "max" where no limit applies: no number
  if ((std::ifstream("/sys/fs/cgroup/memory.max") >> limit) && (std::ifstream("/sys/fs/cgroup/memory.current") >> used)) {
    const uint64_t headroom = limit > used ? limit - used : 0;
    if (avail == 0 || headroom < avail) avail = headroom;
  }
  return avail;
}

}  // namespace tmkit
