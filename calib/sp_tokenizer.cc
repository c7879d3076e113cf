// tokenizer.model through libsentencepiece, with the BOS/EOS rule of tokenizer_config.json.
#include <sentencepiece_processor.h>

#include <nlohmann/json.hpp>

#include "error.h"
#include "tokenizer.h"

namespace tmkit {

namespace {

class SpTokenizer final : public Tokenizer {
 public:
  explicit SpTokenizer(const fs::path& model) : where_(model.string()) {
    const auto status = sp_.Load(model.string());
    if (!status.ok()) fail("{}: cannot load the SentencePiece model: {}", where_, status.ToString());
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
    const auto status = sp_.Encode(sanitize_utf8(text), &ids);
    if (!status.ok()) fail("{}: encode failed: {}", where_, status.ToString());
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
  bool add_bos_ = true, add_eos_ = false;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sp_tokenizer(const fs::path& model) { return std::make_unique<SpTokenizer>(model); }

}  // namespace tmkit
