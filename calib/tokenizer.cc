#include "tokenizer.h"

#include "error.h"
#include "hf_tokenizer.h"
#include "utf8.h"

namespace tmkit {

std::unique_ptr<Tokenizer> load_tokenizer(const fs::path& path) {
  if (fs::is_regular_file(path)) {
    if (path.extension() == ".json") return load_hf_tokenizer(path);
    if (path.extension() == ".model") return load_sp_tokenizer(path);
    fail("{}: not a tokenizer.json or tokenizer.model file", path.string());
  }
  fs::path dir = path;
  if (fs::is_directory(path / "triton_models" / "tokenizer")) dir = path / "triton_models" / "tokenizer";
  if (!fs::is_directory(dir)) fail("{}: no such model folder or workspace", path.string());
  if (fs::exists(dir / "tokenizer.json")) return load_hf_tokenizer(dir / "tokenizer.json");
  if (fs::exists(dir / "tokenizer.model")) return load_sp_tokenizer(dir / "tokenizer.model");
  fail("{}: no tokenizer.json or tokenizer.model", dir.string());
}

std::string sanitize_utf8(std::string_view s, size_t* replaced) {
  size_t bad = 0, i = 0;
  // Fast path: valid input is returned as is.
  while (i < s.size()) {
    const size_t n = utf8::valid_length(s, i);
    if (n == 0) break;
    i += n;
  }
  if (i == s.size()) {
    if (replaced) *replaced = 0;
    return std::string(s);
  }
  std::string out(s.substr(0, i));
  while (i < s.size()) {
    const size_t n = utf8::valid_length(s, i);
    if (n) {
      out.append(s, i, n);
      i += n;
      continue;
    }
    // Skip the maximal prefix of a valid sequence (Python's errors="replace"), at least one byte.
    size_t skip = 1;
    const unsigned c = static_cast<unsigned char>(s[i]);
    const size_t want = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 ? 2 : 1;
    while (skip < want && i + skip < s.size() && (static_cast<unsigned char>(s[i + skip]) & 0xc0) == 0x80) {
      const unsigned b1 = static_cast<unsigned char>(s[i + 1]);
      if (skip == 1 && ((c == 0xe0 && b1 < 0xa0) || (c == 0xed && b1 > 0x9f) || (c == 0xf0 && b1 < 0x90) ||
                        (c == 0xf4 && b1 > 0x8f)))
        break;
      ++skip;
    }
    out += "\xef\xbf\xbd";
    ++bad;
    i += skip;
  }
  if (replaced) *replaced = bad;
  return out;
}

}  // namespace tmkit
