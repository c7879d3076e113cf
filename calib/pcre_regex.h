// A compiled PCRE2 pattern (UTF + Unicode properties, JIT when available), for the
// pre-tokenizer patterns that tokenizer.json files carry (\p{L}, \p{N}, lookaheads, ...).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <string_view>

namespace tmkit {

class Regex {
 public:
  explicit Regex(const std::string& pattern);  // throws tmkit::Error with PCRE2's message
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // Calls on_match(begin, end) for every non-overlapping match, left to right, in valid UTF-8 `s`.
  void for_each_match(std::string_view s, const std::function<void(size_t, size_t)>& on_match) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tmkit
