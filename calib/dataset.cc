#include "dataset.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <system_error>

#include "error.h"
#include "splitmix64.h"

namespace tmkit {

using json = nlohmann::json;

namespace {

// A calibration corpus is megabytes; this only stops a wrong path (a model file, a disk image) from being read
// whole into memory before the tokenizer chokes on it.
constexpr uint64_t kMaxTextBytes = 4ull << 30;

std::string lower_ext(const fs::path& p) {
  std::string e = p.extension().string();
  std::transform(e.begin(), e.end(), e.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return e;
}

bool is_blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; });
}

const char* json_type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
    case json::value_t::number_float: return "a number";
    case json::value_t::object: return "an object";
    case json::value_t::array: return "an array";
    case json::value_t::string: return "a string";
    default: return "something else";
  }
}

// nlohmann's messages start with "[json.exception.parse_error.101] parse error at line 1, ..."; the id is noise to
// a user and the line is always 1 since each line is parsed alone, so keep only what follows the last ": ".
std::string short_json_error(const char* what) {
  std::string_view s(what);
  size_t pos = s.rfind(": ");
  return std::string(pos == std::string_view::npos ? s : s.substr(pos + 2));
}

std::vector<std::string> load_folder(const fs::path& dir) {
  std::vector<fs::path> files;
  std::error_code ec;
  fs::directory_iterator it(dir, ec), end;
  if (ec) fail("{}: cannot list folder: {}", dir.string(), ec.message());
  for (; it != end; it.increment(ec)) {
    if (ec) fail("{}: cannot list folder: {}", dir.string(), ec.message());
    const fs::path& p = it->path();
    // is_regular_file follows symlinks, so a folder of links to the real corpus works too.
    if (p.extension() == ".txt" && fs::is_regular_file(p, ec)) files.push_back(p);
  }
  if (files.empty()) fail("{}: folder holds no .txt files", dir.string());
  // By file name as bytes, not directory order (which differs across file systems), so the token stream and
  // thus the calibration result do not depend on where the folder lives.
  std::sort(files.begin(), files.end(),
            [](const fs::path& a, const fs::path& b) { return a.filename().string() < b.filename().string(); });
  std::vector<std::string> docs;
  docs.reserve(files.size());
  for (const auto& f : files) docs.push_back(read_text_file(f, kMaxTextBytes));
  return docs;
}

std::vector<std::string> load_jsonl(const fs::path& path, const std::string& key) {
  MappedFile f(path);  // not read_text_file: lines are parsed in place, so a big corpus is not held twice
  const char* data = reinterpret_cast<const char*>(f.data());
  const uint64_t size = f.size();
  std::vector<std::string> docs;
  uint64_t pos = 0;
  for (int64_t line_no = 1; pos < size; ++line_no) {
    const char* nl = static_cast<const char*>(std::memchr(data + pos, '\n', size - pos));
    uint64_t end = nl ? uint64_t(nl - data) : size;
    std::string_view line(data + pos, end - pos);
    pos = end + 1;
    if (is_blank(line)) continue;
    json j;
    try {
      j = json::parse(line.begin(), line.end());
    } catch (const json::parse_error& e) {
      fail("{}:{}: bad JSON: {}", path.string(), line_no, short_json_error(e.what()));
    }
    if (!j.is_object()) fail("{}:{}: expected a JSON object, got {}", path.string(), line_no, json_type_name(j));
    auto it = j.find(key);
    if (it == j.end()) fail("{}:{}: no key '{}' (set it with --text-key)", path.string(), line_no, key);
    if (!it->is_string())
      fail("{}:{}: '{}' is {}, not a string", path.string(), line_no, key, json_type_name(*it));
    docs.push_back(it->get<std::string>());
  }
  if (docs.empty()) fail("{}: no documents (the file is empty or blank)", path.string());
  return docs;
}

std::vector<int32_t> load_i32(const fs::path& path, int64_t vocab) {
  MappedFile f(path);
  if (f.size() % 4 != 0)
    fail("{}: size {} bytes is not a multiple of 4, so not int32 token ids", path.string(), f.size());
  std::vector<int32_t> ids(f.size() / 4);
  const uint8_t* p = f.data();
  for (size_t i = 0; i < ids.size(); ++i, p += 4) {
    // Assembled byte by byte: the file is little-endian whatever the host is.
    uint32_t u = uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
    int32_t id = int32_t(u);
    if (id < 0 || id >= vocab)
      fail("{}: token {} is {}, outside the tokenizer's vocabulary [0, {})", path.string(), i, id, vocab);
    ids[i] = id;
  }
  return ids;
}


}  // namespace

std::vector<std::string> load_documents(const fs::path& path, const DatasetOptions& opt) {
  std::error_code ec;
  fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) fail("{}: no such file or folder", path.string());
  if (fs::is_directory(st)) return load_folder(path);
  const std::string ext = lower_ext(path);
  if (ext == ".i32") fail("{}: .i32 files hold token ids, not text documents", path.string());
  if (ext == ".jsonl") {
    if (opt.text_key.empty()) fail("{}: --text-key must not be empty", path.string());
    return load_jsonl(path, opt.text_key);
  }
  return {read_text_file(path, kMaxTextBytes)};
}

std::string join_documents(const std::vector<std::string>& docs) {
  size_t total = 0;
  for (const auto& d : docs) total += d.size() + 2;
  std::string out;
  out.reserve(total);
  for (size_t i = 0; i < docs.size(); ++i) {
    if (i) out += "\n\n";
    out += docs[i];
  }
  return out;
}

std::vector<int32_t> dataset_tokens(const fs::path& path, const Tokenizer& tok, const DatasetOptions& opt) {
  if (lower_ext(path) == ".i32" && !fs::is_directory(path)) return load_i32(path, tok.vocab_size());
  return tok.encode(join_documents(load_documents(path, opt)), false);
}

bool parse_sampling(std::string_view s, Sampling* out) {
  if (s == "contiguous") {
    *out = Sampling::Contiguous;
  } else if (s == "random") {
    *out = Sampling::Random;
  } else {
    return false;
  }
  return true;
}

const char* sampling_name(Sampling s) { return s == Sampling::Random ? "random" : "contiguous"; }

std::vector<int32_t> sample_blocks(const std::vector<int32_t>& tokens, const SampleOptions& opt) {
  if (opt.samples <= 0) fail("--calib-samples must be positive, got {}", opt.samples);
  if (opt.seqlen <= 0) fail("--calib-seqlen must be positive, got {}", opt.seqlen);
  if (opt.samples > std::numeric_limits<int64_t>::max() / opt.seqlen)
    fail("--calib-samples {} x --calib-seqlen {} is too large", opt.samples, opt.seqlen);
  const int64_t n = opt.samples, len = opt.seqlen, total = n * len;
  const int64_t size = int64_t(tokens.size());
  std::vector<int32_t> out;
  if (opt.sampling == Sampling::Contiguous) {
    if (size < total) fail("calibration data has {} tokens, {} samples of {} need {}", size, n, len, total);
    out.assign(tokens.begin(), tokens.begin() + total);
    return out;
  }
  if (size < len)
    fail("calibration data has {} tokens, random samples of {} need at least {}", size, len, len);
  out.resize(size_t(total));
  SplitMix64 rng{opt.seed};
  const uint64_t starts = uint64_t(size - len) + 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t start = int64_t(rng.below(starts));
    std::copy_n(tokens.begin() + start, len, out.begin() + i * len);
  }
  return out;
}

}  // namespace tmkit
