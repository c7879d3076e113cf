// splitmix64 (Steele, Lea, Flood 2014): a tiny, fully specified generator, so that a seed gives the
// same numbers on every machine and compiler (unlike <random>'s distributions). Used for random
// calibration windows, synthetic checkpoints and test inputs.
#pragma once
#include <cstdint>

namespace tmkit {

struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n), n > 0, without modulo bias: draws below 2^64 mod n are rejected, so the
  // accepted range is a whole multiple of n.
  uint64_t below(uint64_t n) {
    const uint64_t threshold = (0 - n) % n;
    for (;;) {
      const uint64_t x = next();
      if (x >= threshold) return x % n;
    }
  }
  // Uniform in [-1, 1).
  double symmetric() { return double(next() >> 11) * 0x1.0p-53 * 2.0 - 1.0; }
};

}  // namespace tmkit
