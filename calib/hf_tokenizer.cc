#include "hf_tokenizer.h"

#include <algorithm>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <unordered_map>

#include "bpe_model.h"
#include "error.h"
#include "json_limits.h"
#include "pcre_regex.h"
#include "utf8.h"

namespace tmkit {

using json = nlohmann::json;

namespace {

const std::string kMetaspace = "\xe2\x96\x81";  // U+2581 "▁"

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  if (from.empty()) return std::string(s);
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string_view::npos; pos = hit + from.size()) {
    out.append(s.substr(pos, hit - pos));
    out.append(to);
  }
  out.append(s.substr(pos));
  return out;
}

// Reads obj[key] as T, failing with the JSON path when absent or of the wrong type.
template <typename T>
T field(const json& obj, const char* key, const std::string& path) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) fail("{}.{}: missing", path, key);
  try {
    return it->get<T>();
  } catch (const json::exception&) {
    fail("{}.{}: wrong type", path, key);
  }
}

template <typename T>
T field_or(const json& obj, const char* key, T dflt, const std::string& path) {
  auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? dflt : field<T>(obj, key, path);
}

std::string type_of(const json& node, const std::string& path) {
  if (!node.is_object()) fail("{}: expected an object", path);
  return field<std::string>(node, "type", path);
}

// A pattern field: {"String": "..."} or {"Regex": "..."}.
struct Pattern {
  std::string literal;
  std::shared_ptr<Regex> regex;
  static Pattern parse(const json& node, const std::string& path) {
    Pattern p;
    if (node.is_object() && node.contains("Regex")) p.regex = std::make_shared<Regex>(field<std::string>(node, "Regex", path));
    else if (node.is_object() && node.contains("String")) p.literal = field<std::string>(node, "String", path);
    else fail("{}: expected {{\"String\": ..}} or {{\"Regex\": ..}}", path);
    return p;
  }
  // Matches as (begin, end) ranges.
  std::vector<std::pair<size_t, size_t>> matches(std::string_view s) const {
    std::vector<std::pair<size_t, size_t>> out;
    if (regex) {
      regex->for_each_match(s, [&](size_t b, size_t e) { out.emplace_back(b, e); });
    } else if (!literal.empty()) {
      for (size_t pos = 0, hit; (hit = s.find(literal, pos)) != std::string_view::npos; pos = hit + literal.size())
        out.emplace_back(hit, hit + literal.size());
    }
    return out;
  }
};

struct AddedToken {
  int32_t id;
  std::string content;
  bool lstrip, rstrip, special;
};

// One normalizer or pre-tokenizer step.
struct Step {
  std::string type;
  Pattern pattern;
  std::string content, behavior;  // Replace / Prepend content; Split behavior
  bool invert = false, add_prefix_space = false, use_regex = false, split = false, individual_digits = false;
  std::string prepend_scheme = "always";
};

struct DecodeStep {
  std::string type;
  std::string pattern, content, prepend_scheme = "always";
  int start = 0, stop = 0;
};

class HfTokenizer final : public Tokenizer {
 public:
  HfTokenizer(std::string_view text, const std::string& where);
  std::vector<int32_t> encode(std::string_view text, bool add_special) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override { return vocab_size_; }
  std::string kind() const override { return byte_level_ ? "bpe-bytelevel" : "bpe-metaspace"; }

 private:
  void parse_model(const json& m);
  void parse_normalizer(const json& n, const std::string& path);
  void parse_pre_tokenizer(const json& p, const std::string& path);
  void parse_post_processor(const json& p, const std::string& path);
  void parse_decoder(const json& d, const std::string& path);

  std::string normalize(std::string s) const;
  std::vector<std::string> pre_tokenize(std::string s, bool first_segment) const;
  void encode_piece(const std::string& piece, std::vector<int32_t>& out) const;
  int32_t token_id(const std::string& s) const {
    auto it = vocab_.find(s);
    return it == vocab_.end() ? -1 : it->second;
  }

  std::string where_;
  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  BpeMerges merges_;
  bool byte_level_ = false, byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;
  int32_t unk_id_ = -1;
  int32_t byte_ids_[256];   // byte-level: id of each byte's symbol
  int32_t fallback_ids_[256];  // byte fallback: id of <0xXX>
  std::vector<AddedToken> added_;  // longest content first
  bool added_first_byte_[256] = {};
  std::vector<Step> normalizers_, pre_tokenizers_;
  std::vector<DecodeStep> decoders_;
  std::vector<std::pair<bool, std::vector<int32_t>>> template_;  // (is_sequence, special ids)
  int64_t vocab_size_ = 0;

  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

HfTokenizer::HfTokenizer(std::string_view text, const std::string& where) : where_(where) {
  const json j = parse_json(text, 32, where_);
  if (!j.is_object() || !j.contains("model")) fail("{}: no 'model' section", where_);
  parse_model(j["model"]);
  if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) fail("{}: added_tokens: expected an array", where_);
    for (size_t i = 0; i < it->size(); ++i) {
      const json& t = (*it)[i];
      const std::string path = fmt::format("{}: added_tokens[{}]", where_, i);
      AddedToken a{field<int32_t>(t, "id", path), field<std::string>(t, "content", path),
                   field_or<bool>(t, "lstrip", false, path), field_or<bool>(t, "rstrip", false, path),
                   field_or<bool>(t, "special", false, path)};
      if (a.id < 0 || a.content.empty()) fail("{}: bad id or empty content", path);
      if (a.id >= int32_t(id_to_token_.size())) id_to_token_.resize(size_t(a.id) + 1);
      id_to_token_[size_t(a.id)] = a.content;
      added_first_byte_[static_cast<unsigned char>(a.content[0])] = true;
      added_.push_back(std::move(a));
    }
    std::stable_sort(added_.begin(), added_.end(), [](auto& a, auto& b) { return a.content.size() > b.content.size(); });
  }
  vocab_size_ = int64_t(id_to_token_.size());
  parse_normalizer(j.value("normalizer", json()), where_ + ": normalizer");
  parse_pre_tokenizer(j.value("pre_tokenizer", json()), where_ + ": pre_tokenizer");
  parse_post_processor(j.value("post_processor", json()), where_ + ": post_processor");
  parse_decoder(j.value("decoder", json()), where_ + ": decoder");
  for (const auto& s : pre_tokenizers_) byte_level_ |= s.type == "ByteLevel";
  if (byte_level_) {
    const auto& table = utf8::byte_to_unicode();
    for (int b = 0; b < 256; ++b) {
      std::string ch;
      utf8::append(ch, table[size_t(b)]);
      byte_ids_[b] = token_id(ch);
    }
  }
}

void HfTokenizer::parse_model(const json& m) {
  const std::string path = where_ + ": model";
  const std::string type = m.is_object() ? m.value("type", std::string("BPE")) : "";
  if (type != "BPE") fail("{}.type: unsupported tokenizer model '{}' (supported: BPE)", path, type);
  if (!field_or<std::string>(m, "continuing_subword_prefix", "", path).empty() ||
      !field_or<std::string>(m, "end_of_word_suffix", "", path).empty())
    fail("{}: continuing_subword_prefix / end_of_word_suffix are not supported", path);
  if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"].get<double>() > 0)
    fail("{}.dropout: BPE dropout is not supported for deterministic tokenization", path);
  byte_fallback_ = field_or<bool>(m, "byte_fallback", false, path);
  fuse_unk_ = field_or<bool>(m, "fuse_unk", false, path);
  ignore_merges_ = field_or<bool>(m, "ignore_merges", false, path);
  const json& vocab = m.contains("vocab") ? m["vocab"] : json();
  if (!vocab.is_object()) fail("{}.vocab: expected an object", path);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > (1 << 24))
      fail("{}.vocab['{}']: id out of range", path, it.key());
    const int32_t id = it.value().get<int32_t>();
    vocab_[it.key()] = id;
    if (id >= int32_t(id_to_token_.size())) id_to_token_.resize(size_t(id) + 1);
    id_to_token_[size_t(id)] = it.key();
  }
  if (auto unk = field_or<std::string>(m, "unk_token", "", path); !unk.empty()) {
    unk_id_ = token_id(unk);
    if (unk_id_ < 0) fail("{}.unk_token: '{}' is not in the vocabulary", path, unk);
  }
  for (int b = 0; b < 256; ++b) fallback_ids_[b] = token_id(fmt::format("<0x{:02X}>", b));
  const json& merges = m.contains("merges") ? m["merges"] : json::array();
  if (!merges.is_array()) fail("{}.merges: expected an array", path);
  for (size_t r = 0; r < merges.size(); ++r) {
    std::string a, b;
    const json& e = merges[r];
    if (e.is_string()) {  // "left right"
      const std::string s = e.get<std::string>();
      const size_t sp = s.find(' ', 1);
      if (sp == std::string::npos) fail("{}.merges[{}]: '{}' is not a pair", path, r, s);
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      fail("{}.merges[{}]: expected a pair", path, r);
    }
    const int32_t ia = token_id(a), ib = token_id(b), im = token_id(a + b);
    if (ia < 0 || ib < 0 || im < 0) fail("{}.merges[{}]: '{}' + '{}' uses a token missing from the vocabulary", path, r, a, b);
    merges_.add(ia, ib, int32_t(r), im);
  }
}

void HfTokenizer::parse_normalizer(const json& n, const std::string& path) {
  if (n.is_null()) return;
  const std::string type = type_of(n, path);
  if (type == "Sequence") {
    const json& list = n.contains("normalizers") ? n["normalizers"] : json();
    if (!list.is_array()) fail("{}.normalizers: expected an array", path);
    for (size_t i = 0; i < list.size(); ++i) parse_normalizer(list[i], fmt::format("{}.normalizers[{}]", path, i));
    return;
  }
  Step s;
  s.type = type;
  if (type == "Prepend") s.content = field<std::string>(n, "prepend", path);
  else if (type == "Replace") {
    s.pattern = Pattern::parse(n.value("pattern", json()), path + ".pattern");
    s.content = field<std::string>(n, "content", path);
  } else fail("{}.type: unsupported normalizer '{}' (supported: Sequence, Prepend, Replace)", path, type);
  normalizers_.push_back(std::move(s));
}

void HfTokenizer::parse_pre_tokenizer(const json& p, const std::string& path) {
  if (p.is_null()) return;
  const std::string type = type_of(p, path);
  if (type == "Sequence") {
    const json& list = p.contains("pretokenizers") ? p["pretokenizers"] : json();
    if (!list.is_array()) fail("{}.pretokenizers: expected an array", path);
    for (size_t i = 0; i < list.size(); ++i) parse_pre_tokenizer(list[i], fmt::format("{}.pretokenizers[{}]", path, i));
    return;
  }
  if (!pre_tokenizers_.empty() && pre_tokenizers_.back().type == "ByteLevel")
    fail("{}: a pre-tokenizer after ByteLevel is not supported", path);
  Step s;
  s.type = type;
  if (type == "Split") {
    s.pattern = Pattern::parse(p.value("pattern", json()), path + ".pattern");
    s.behavior = field<std::string>(p, "behavior", path);
    s.invert = field_or<bool>(p, "invert", false, path);
    if (s.invert) fail("{}.invert: inverted Split is not supported", path);
    if (s.behavior != "Isolated" && s.behavior != "Removed" && s.behavior != "MergedWithPrevious" &&
        s.behavior != "MergedWithNext")
      fail("{}.behavior: unsupported Split behavior '{}'", path, s.behavior);
  } else if (type == "ByteLevel") {
    s.add_prefix_space = field_or<bool>(p, "add_prefix_space", false, path);
    s.use_regex = field_or<bool>(p, "use_regex", true, path);
    if (s.use_regex)  // GPT-2's pattern, as HF's ByteLevel uses it
      s.pattern.regex = std::make_shared<Regex>(R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)");
  } else if (type == "Metaspace") {
    s.content = field_or<std::string>(p, "replacement", kMetaspace, path);
    s.prepend_scheme = field_or<std::string>(p, "prepend_scheme", "", path);
    if (s.prepend_scheme.empty()) s.prepend_scheme = field_or<bool>(p, "add_prefix_space", true, path) ? "always" : "never";
    if (s.prepend_scheme != "always" && s.prepend_scheme != "first" && s.prepend_scheme != "never")
      fail("{}.prepend_scheme: unsupported value '{}'", path, s.prepend_scheme);
    s.split = field_or<bool>(p, "split", true, path);
  } else if (type == "Digits") {
    s.individual_digits = field_or<bool>(p, "individual_digits", false, path);
    s.pattern.regex = std::make_shared<Regex>(s.individual_digits ? R"(\p{N})" : R"(\p{N}+)");
  } else {
    fail("{}.type: unsupported pre-tokenizer '{}' (supported: Sequence, Split, ByteLevel, Metaspace, Digits)", path, type);
  }
  pre_tokenizers_.push_back(std::move(s));
}

void HfTokenizer::parse_post_processor(const json& p, const std::string& path) {
  if (p.is_null()) return;
  const std::string type = type_of(p, path);
  auto special = [&](const std::string& name) -> std::vector<int32_t> {
    const json& st = p.contains("special_tokens") ? p["special_tokens"] : json::object();
    if (st.contains(name)) return field<std::vector<int32_t>>(st[name], "ids", path + ".special_tokens." + name);
    for (const auto& a : added_)
      if (a.content == name) return {a.id};
    fail("{}: special token '{}' is not defined", path, name);
  };
  if (type == "Sequence") {
    const json& list = p.contains("processors") ? p["processors"] : json();
    if (!list.is_array()) fail("{}.processors: expected an array", path);
    for (size_t i = 0; i < list.size(); ++i) parse_post_processor(list[i], fmt::format("{}.processors[{}]", path, i));
  } else if (type == "ByteLevel") {
    // Only adjusts offsets; ids are unchanged.
  } else if (type == "TemplateProcessing") {
    if (!template_.empty()) fail("{}: more than one template", path);
    const json& single = p.contains("single") ? p["single"] : json();
    if (!single.is_array()) fail("{}.single: expected an array", path);
    for (const json& item : single) {
      if (item.contains("Sequence")) template_.push_back({true, {}});
      else if (item.contains("SpecialToken")) template_.push_back({false, special(field<std::string>(item["SpecialToken"], "id", path + ".single"))});
      else fail("{}.single: unknown template item {}", path, item.dump());
    }
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    auto id_of = [&](const char* key) {
      const json& v = p.contains(key) ? p[key] : json();
      if (!v.is_array() || v.size() != 2 || !v[1].is_number_integer()) fail("{}.{}: expected [token, id]", path, key);
      return v[1].get<int32_t>();
    };
    template_ = {{false, {id_of("cls")}}, {true, {}}, {false, {id_of("sep")}}};
  } else {
    fail("{}.type: unsupported post-processor '{}'", path, type);
  }
}

void HfTokenizer::parse_decoder(const json& d, const std::string& path) {
  if (d.is_null()) return;
  const std::string type = type_of(d, path);
  if (type == "Sequence") {
    const json& list = d.contains("decoders") ? d["decoders"] : json();
    if (!list.is_array()) fail("{}.decoders: expected an array", path);
    for (size_t i = 0; i < list.size(); ++i) parse_decoder(list[i], fmt::format("{}.decoders[{}]", path, i));
    return;
  }
  DecodeStep s;
  s.type = type;
  if (type == "Replace") {
    const json& pat = d.value("pattern", json());
    if (!pat.is_object() || !pat.contains("String")) fail("{}.pattern: only String patterns are supported", path);
    s.pattern = field<std::string>(pat, "String", path + ".pattern");
    s.content = field<std::string>(d, "content", path);
  } else if (type == "Strip") {
    s.content = field<std::string>(d, "content", path);
    s.start = field_or<int>(d, "start", 0, path);
    s.stop = field_or<int>(d, "stop", 0, path);
  } else if (type == "Metaspace") {
    s.content = field_or<std::string>(d, "replacement", kMetaspace, path);
    s.prepend_scheme = field_or<std::string>(d, "prepend_scheme", "", path);
    if (s.prepend_scheme.empty()) s.prepend_scheme = field_or<bool>(d, "add_prefix_space", true, path) ? "always" : "never";
  } else if (type != "ByteLevel" && type != "ByteFallback" && type != "Fuse") {
    fail("{}.type: unsupported decoder '{}' (supported: Sequence, ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip)", path, type);
  }
  decoders_.push_back(std::move(s));
}

std::string HfTokenizer::normalize(std::string s) const {
  for (const Step& n : normalizers_) {
    if (n.type == "Prepend") {
      if (!s.empty()) s = n.content + s;
    } else {  // Replace
      std::string out;
      size_t pos = 0;
      for (auto [b, e] : n.pattern.matches(s)) {
        out.append(s, pos, b - pos);
        out += n.content;
        pos = e;
      }
      out.append(s, pos);
      s = std::move(out);
    }
  }
  return s;
}

std::vector<std::string> HfTokenizer::pre_tokenize(std::string text, bool first_segment) const {
  std::vector<std::string> pieces{std::move(text)};
  for (const Step& st : pre_tokenizers_) {
    std::vector<std::string> next;
    for (size_t pi = 0; pi < pieces.size(); ++pi) {
      std::string& p = pieces[pi];
      if (st.type == "Metaspace") {
        p = replace_all(p, " ", st.content);
        const bool prepend = st.prepend_scheme == "always" || (st.prepend_scheme == "first" && first_segment && pi == 0);
        if (prepend && p.compare(0, st.content.size(), st.content) != 0) p = st.content + p;
        if (!st.split) {
          next.push_back(std::move(p));
          continue;
        }
        size_t start = 0;  // split before each replacement char, keeping it with what follows
        for (size_t hit; (hit = p.find(st.content, start + 1)) != std::string::npos; start = hit)
          next.push_back(p.substr(start, hit - start));
        next.push_back(p.substr(start));
        continue;
      }
      if (st.type == "ByteLevel") {
        if (st.add_prefix_space && pi == 0 && !p.empty() && p[0] != ' ') p = " " + p;
        if (!st.use_regex) {
          next.push_back(std::move(p));
          continue;
        }
      }
      // Split-like: regex matches and the gaps between them, by the step's behavior.
      const std::string behavior = st.type == "Split" ? st.behavior : "Isolated";
      size_t pos = 0;
      std::string carry;  // MergedWithNext: a match waiting for what follows it
      auto emit = [&](std::string s) {
        if (!s.empty()) next.push_back(std::move(s));
      };
      for (auto [b, e] : st.pattern.matches(p)) {
        std::string gap = p.substr(pos, b - pos), match = p.substr(b, e - b);
        if (behavior == "Isolated") {
          emit(std::move(gap));
          emit(std::move(match));
        } else if (behavior == "Removed") {
          emit(std::move(gap));
        } else if (behavior == "MergedWithPrevious") {
          emit(gap + match);
        } else {  // MergedWithNext
          emit(carry + gap);
          carry = std::move(match);
        }
        pos = e;
      }
      emit(carry + p.substr(pos));
    }
    pieces = std::move(next);
  }
  return pieces;
}

void HfTokenizer::encode_piece(const std::string& piece, std::vector<int32_t>& out) const {
  const bool cacheable = piece.size() <= 64;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (auto it = cache_.find(piece); it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  if (byte_level_) {
    std::string mapped;  // the piece in the vocabulary's byte-level alphabet, for ignore_merges
    if (ignore_merges_) {
      for (unsigned char c : piece) utf8::append(mapped, utf8::byte_to_unicode()[c]);
      if (int32_t id = token_id(mapped); id >= 0) ids.push_back(id);
    }
    if (ids.empty()) {
      for (unsigned char c : piece) {
        if (byte_ids_[c] >= 0) ids.push_back(byte_ids_[c]);
        else if (unk_id_ >= 0 && !(fuse_unk_ && !ids.empty() && ids.back() == unk_id_)) ids.push_back(unk_id_);
      }
      merges_.apply(ids);
    }
  } else if (int32_t whole = ignore_merges_ ? token_id(piece) : -1; whole >= 0) {
    ids.push_back(whole);
  } else {
    for (size_t i = 0; i < piece.size();) {
      size_t n = utf8::valid_length(piece, i);
      if (n == 0) n = 1;
      const int32_t id = token_id(piece.substr(i, n));
      if (id >= 0) {
        ids.push_back(id);
      } else if (byte_fallback_ && fallback_ids_[static_cast<unsigned char>(piece[i])] >= 0) {
        for (size_t k = 0; k < n; ++k) ids.push_back(fallback_ids_[static_cast<unsigned char>(piece[i + k])]);
      } else if (unk_id_ >= 0 && !(fuse_unk_ && !ids.empty() && ids.back() == unk_id_)) {
        ids.push_back(unk_id_);
      }
      i += n;
    }
    merges_.apply(ids);
  }
  out.insert(out.end(), ids.begin(), ids.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (cache_.size() < (1u << 20)) cache_.emplace(piece, std::move(ids));
  }
}

std::vector<int32_t> HfTokenizer::encode(std::string_view raw, bool add_special) const {
  const std::string text = sanitize_utf8(raw);
  std::vector<int32_t> ids;
  bool first_segment = true;
  auto encode_text = [&](size_t b, size_t e) {
    if (e <= b) return;
    for (const std::string& piece : pre_tokenize(normalize(text.substr(b, e - b)), first_segment)) encode_piece(piece, ids);
    first_segment = false;
  };
  // Added tokens are matched on the raw text, leftmost then longest, before anything else.
  size_t pos = 0, seg = 0;
  while (pos < text.size()) {
    const AddedToken* hit = nullptr;
    if (added_first_byte_[static_cast<unsigned char>(text[pos])])
      for (const AddedToken& a : added_)
        if (text.compare(pos, a.content.size(), a.content) == 0) {
          hit = &a;
          break;
        }
    if (!hit) {
      ++pos;
      continue;
    }
    size_t b = pos, e = pos + hit->content.size();
    if (hit->lstrip)
      while (b > seg && std::isspace(static_cast<unsigned char>(text[b - 1]))) --b;
    if (hit->rstrip)
      while (e < text.size() && std::isspace(static_cast<unsigned char>(text[e]))) ++e;
    encode_text(seg, b);
    ids.push_back(hit->id);
    first_segment = false;
    pos = seg = e;
  }
  encode_text(seg, text.size());
  if (!add_special || template_.empty()) return ids;
  std::vector<int32_t> out;
  for (const auto& [is_sequence, special] : template_) {
    const auto& src = is_sequence ? ids : special;
    out.insert(out.end(), src.begin(), src.end());
  }
  return out;
}

std::string HfTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (id < 0 || id >= int32_t(id_to_token_.size())) fail("{}: cannot decode token id {}", where_, id);
    tokens.push_back(id_to_token_[size_t(id)]);
  }
  for (const DecodeStep& d : decoders_) {
    if (d.type == "ByteLevel") {
      static const std::unordered_map<uint32_t, char> to_byte = [] {
        std::unordered_map<uint32_t, char> m;
        for (int b = 0; b < 256; ++b) m[utf8::byte_to_unicode()[size_t(b)]] = char(b);
        return m;
      }();
      std::string bytes;
      for (const std::string& t : tokens)
        for (size_t i = 0; i < t.size();) {
          size_t n = std::max<size_t>(1, utf8::valid_length(t, i));
          auto it = to_byte.find(utf8::decode(t, i, n));
          if (it != to_byte.end()) bytes += it->second;
          else bytes.append(t, i, n);
          i += n;
        }
      tokens = {sanitize_utf8(bytes)};
    } else if (d.type == "Replace") {
      for (auto& t : tokens) t = replace_all(t, d.pattern, d.content);
    } else if (d.type == "ByteFallback") {
      std::vector<std::string> out;
      std::string pending;  // bytes of consecutive <0xXX> tokens
      size_t pending_count = 0;
      auto flush = [&] {
        if (pending_count == 0) return;
        size_t bad = 0;
        std::string s = sanitize_utf8(pending, &bad);
        if (bad) out.insert(out.end(), pending_count, "\xef\xbf\xbd");  // HF: one U+FFFD per byte
        else out.push_back(s);
        pending.clear();
        pending_count = 0;
      };
      for (auto& t : tokens) {
        unsigned v = 0;
        if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && std::sscanf(t.c_str() + 3, "%2x", &v) == 1) {
          pending += char(v);
          ++pending_count;
        } else {
          flush();
          out.push_back(std::move(t));
        }
      }
      flush();
      tokens = std::move(out);
    } else if (d.type == "Fuse") {
      std::string all;
      for (const auto& t : tokens) all += t;
      tokens = {all};
    } else if (d.type == "Strip") {
      for (auto& t : tokens) {
        int a = 0, z = 0;
        while (a < d.start && t.compare(0, d.content.size(), d.content) == 0) t.erase(0, d.content.size()), ++a;
        while (z < d.stop && t.size() >= d.content.size() &&
               t.compare(t.size() - d.content.size(), d.content.size(), d.content) == 0)
          t.erase(t.size() - d.content.size()), ++z;
      }
    } else if (d.type == "Metaspace") {
      for (size_t i = 0; i < tokens.size(); ++i) {
        tokens[i] = replace_all(tokens[i], d.content, " ");
        if (i == 0 && d.prepend_scheme != "never" && !tokens[i].empty() && tokens[i][0] == ' ') tokens[i].erase(0, 1);
      }
    }
  }
  std::string out;
  for (const auto& t : tokens) out += t;
  return out;
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer(const fs::path& tokenizer_json) {
  return std::make_unique<HfTokenizer>(read_text_file(tokenizer_json, 256ull << 20), tokenizer_json.string());
}

std::unique_ptr<Tokenizer> parse_hf_tokenizer(std::string_view json_text, const std::string& where) {
  return std::make_unique<HfTokenizer>(json_text, where);
}

}  // namespace tmkit
