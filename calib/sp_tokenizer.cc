// tokenizer.model: libsentencepiece, with the BOS/EOS rule of tokenizer_config.json. BPE models with
// identity normalization (Llama's) encode through tmkit's own BPE engine, which applies
// SentencePiece's rule exactly and is several times faster than Debian's libsentencepiece.
#include <sentencepiece_processor.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <unordered_map>

#include "bpe_model.h"
#include "error.h"
#include "sp_model.h"
#include "tokenizer.h"
#include "utf8.h"

namespace tmkit {

namespace {

const std::string kSpace = "\xe2\x96\x81";  // U+2581, SentencePiece's escaped space

// Whether the character before byte `end` of `s` is the escaped space. The space's first byte is
// a UTF-8 lead byte, so a byte match is always a whole character.
bool ends_with_space(std::string_view s, size_t end) {
  return end >= kSpace.size() && s.compare(end - kSpace.size(), kSpace.size(), kSpace) == 0;
}

// SentencePiece BPE: repeatedly merge the adjacent pair whose concatenation is the
// highest-scoring piece, leftmost first among equal scores. As BpeMerges ranks: every split
// (left, right) of a mergeable piece gets the dense rank of that piece's score.
class NativeSpBpe {
 public:
  // Engaged only when the model is one this class reproduces exactly.
  static std::optional<NativeSpBpe> make(const SpModel& m) {
    if (m.model_type != 2 || m.has_charsmap || (!m.normalizer_name.empty() && m.normalizer_name != "identity") ||
        m.remove_extra_whitespaces || !m.escape_whitespaces || m.treat_whitespace_as_suffix)
      return std::nullopt;
    NativeSpBpe b;
    std::map<float, int32_t, std::greater<float>> score_rank;
    for (size_t i = 0; i < m.pieces.size(); ++i) {
      const auto& p = m.pieces[i];
      if (p.type == SpModel::UserDefined || p.type == SpModel::Unused) return std::nullopt;  // matched differently
      if (p.type == SpModel::Normal) {
        b.pieces_.emplace(p.text, int32_t(i));
        score_rank.emplace(p.score, 0);
      }
      if (p.type == SpModel::Unknown) b.unk_ = int32_t(i);
      if (p.type == SpModel::Byte && p.text.size() == 6) {
        unsigned v = 0;
        if (std::sscanf(p.text.c_str(), "<0x%2X>", &v) == 1) b.byte_ids_[v] = int32_t(i);
      }
    }
    if (b.unk_ < 0) return std::nullopt;
    int32_t r = 0;
    for (auto& [score, rank] : score_rank) rank = r++;
    for (const auto& [text, id] : b.pieces_) {
      for (size_t k = utf8::valid_length(text, 0); k > 0 && k < text.size(); k += std::max<size_t>(1, utf8::valid_length(text, k))) {
        auto l = b.pieces_.find(text.substr(0, k)), rt = b.pieces_.find(text.substr(k));
        if (l != b.pieces_.end() && rt != b.pieces_.end()) b.merges_.add(l->second, rt->second, score_rank[m.pieces[size_t(id)].score], id);
      }
      // A piece with a space after another character would let merges cross word starts.
      for (size_t k = 1; k + kSpace.size() <= text.size(); ++k)
        if (text.compare(k, kSpace.size(), kSpace) == 0 && !ends_with_space(text, k)) b.chunkable_ = false;
    }
    b.byte_fallback_ = m.byte_fallback;
    b.add_dummy_prefix_ = m.add_dummy_prefix;
    return b;
  }

  std::vector<int32_t> encode(const std::string& text) const {
    std::string s;
    if (text.empty()) return {};
    if (add_dummy_prefix_) s = kSpace;
    for (char ch : text) {
      if (ch == ' ') s += kSpace;
      else s += ch;
    }
    std::vector<int32_t> out;
    if (!chunkable_) {
      encode_chunk(s, out);
      return out;
    }
    // Chunks start where a run of spaces follows another character: no piece spans that point.
    size_t start = 0;
    for (size_t i = 1; i + kSpace.size() <= s.size(); ++i) {
      if (s.compare(i, kSpace.size(), kSpace) == 0 && !ends_with_space(s, i)) {
        encode_chunk(std::string_view(s).substr(start, i - start), out);
        start = i;
      }
    }
    encode_chunk(std::string_view(s).substr(start), out);
    return out;
  }

 private:
  void encode_chunk(std::string_view chunk, std::vector<int32_t>& out) const {
    if (chunk.empty()) return;
    const bool cacheable = chunk.size() <= 64;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(*mu_);
      if (auto it = cache_->find(std::string(chunk)); it != cache_->end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> ids;
    std::vector<std::string_view> unknown;  // chars outside the vocabulary, in order (they never merge)
    for (size_t i = 0; i < chunk.size();) {
      const size_t n = std::max<size_t>(1, utf8::valid_length(chunk, i));
      auto it = pieces_.find(std::string(chunk.substr(i, n)));
      if (it != pieces_.end()) {
        ids.push_back(it->second);
      } else {
        ids.push_back(-1);
        unknown.push_back(chunk.substr(i, n));
      }
      i += n;
    }
    merges_.apply(ids);
    std::vector<int32_t> result;
    size_t u = 0;
    for (int32_t id : ids) {
      if (id >= 0) {
        result.push_back(id);
        continue;
      }
      const std::string_view ch = unknown[u++];
      bool all_bytes = byte_fallback_;
      for (unsigned char c : ch) all_bytes = all_bytes && byte_ids_[c] >= 0;
      if (all_bytes) {
        for (unsigned char c : ch) result.push_back(byte_ids_[c]);
      } else if (result.empty() || result.back() != unk_ || byte_fallback_) {
        result.push_back(unk_);  // consecutive unknowns fold into one, as SentencePiece does
      }
    }
    out.insert(out.end(), result.begin(), result.end());
    if (cacheable) {
      std::lock_guard<std::mutex> lock(*mu_);
      if (cache_->size() < (1u << 20)) cache_->emplace(std::string(chunk), std::move(result));
    }
  }

  std::unordered_map<std::string, int32_t> pieces_;  // mergeable (normal) pieces
  BpeMerges merges_;
  int32_t unk_ = -1;
  int32_t byte_ids_[256] = {};
  bool byte_fallback_ = false, add_dummy_prefix_ = true, chunkable_ = true;
  std::shared_ptr<std::mutex> mu_ = std::make_shared<std::mutex>();
  std::shared_ptr<std::unordered_map<std::string, std::vector<int32_t>>> cache_ =
      std::make_shared<std::unordered_map<std::string, std::vector<int32_t>>>();

  NativeSpBpe() { std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1); }
};

class SpTokenizer final : public Tokenizer {
 public:
  SpTokenizer(const fs::path& model, bool native) : where_(model.string()) {
    const std::string bytes = read_text_file(model, 1ull << 30);
    const auto status = sp_.LoadFromSerializedProto(bytes);
    if (!status.ok()) fail("{}: cannot load the SentencePiece model: {}", where_, status.ToString());
    if (native) native_ = NativeSpBpe::make(parse_sp_model(bytes, where_));
    // HF's LlamaTokenizer adds BOS (and no EOS) unless tokenizer_config.json says otherwise.
    const fs::path cfg = model.parent_path() / "tokenizer_config.json";
    if (fs::exists(cfg)) {
      try {
        const auto j = nlohmann::json::parse(read_text_file(cfg));
        if (j.contains("add_bos_token") && j["add_bos_token"].is_boolean()) add_bos_ = j["add_bos_token"].get<bool>();
        if (j.contains("add_eos_token") && j["add_eos_token"].is_boolean()) add_eos_ = j["add_eos_token"].get<bool>();
      } catch (const nlohmann::json::exception& e) {
        fail("{}: not valid JSON: {}", cfg.string(), e.what());
      }
    }
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special) const override {
    std::vector<int> ids;
    if (native_) {
      const auto v = native_->encode(sanitize_utf8(text));
      ids.assign(v.begin(), v.end());
    } else {
      const auto status = sp_.Encode(sanitize_utf8(text), &ids);
      if (!status.ok()) fail("{}: encode failed: {}", where_, status.ToString());
    }
    std::vector<int32_t> out;
    if (add_special && add_bos_ && sp_.bos_id() >= 0) out.push_back(sp_.bos_id());
    out.insert(out.end(), ids.begin(), ids.end());
    if (add_special && add_eos_ && sp_.eos_id() >= 0) out.push_back(sp_.eos_id());
    return out;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    std::vector<int> v(ids.begin(), ids.end());
    for (int id : v)
      if (id < 0 || id >= sp_.GetPieceSize()) fail("{}: cannot decode token id {}", where_, id);
    std::string text;
    const auto status = sp_.Decode(v, &text);
    if (!status.ok()) fail("{}: decode failed: {}", where_, status.ToString());
    return text;
  }

  int64_t vocab_size() const override { return sp_.GetPieceSize(); }
  std::string kind() const override { return "sentencepiece"; }

 private:
  std::string where_;
  sentencepiece::SentencePieceProcessor sp_;
  std::optional<NativeSpBpe> native_;
  bool add_bos_ = true, add_eos_ = false;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sp_tokenizer(const fs::path& model, bool native) {
  return std::make_unique<SpTokenizer>(model, native);
}

}  // namespace tmkit
