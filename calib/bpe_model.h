// The BPE merge engine shared by every BPE tokenizer: given a word as a sequence of symbol ids,
// apply merges by rank until none applies, as Hugging Face tokenizers does (lowest rank first,
// leftmost first among equal ranks). A heap keeps long words O(n log n).
#pragma once
#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace tmkit {

class BpeMerges {
 public:
  void add(int32_t left, int32_t right, int32_t rank, int32_t merged);
  // Merges `symbols` in place.
  void apply(std::vector<int32_t>& symbols) const;
  size_t size() const { return pairs_.size(); }

 private:
  struct Merge { int32_t rank, merged; };
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  const Merge* find(int32_t a, int32_t b) const {
    auto it = pairs_.find(key(a, b));
    return it == pairs_.end() ? nullptr : &it->second;
  }
  std::unordered_map<uint64_t, Merge> pairs_;
};

}  // namespace tmkit
