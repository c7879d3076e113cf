// Text -> token ids exactly as a model's own tokenizer produces them, and back.
//
// Loaded from a model's files, either an HF model folder or a workspace's
// triton_models/tokenizer/: `tokenizer.json` (BPE, byte-level or SentencePiece-style) is
// preferred, `tokenizer.model` (SentencePiece, through libsentencepiece) otherwise.
// Invalid UTF-8 in the input is replaced by U+FFFD, as Python's errors="replace" does.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "file_io.h"

namespace tmkit {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // `add_special`: apply the model's post-processor (e.g. prepend BOS), as HF's
  // add_special_tokens=True does.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special = false) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::string kind() const = 0;  // "bpe-bytelevel", "bpe-metaspace", "sentencepiece"
};

// `path`: an HF model folder, a workspace, or a tokenizer.json / tokenizer.model file.
std::unique_ptr<Tokenizer> load_tokenizer(const fs::path& path);

// A tokenizer.model. BPE models with identity normalization encode through tmkit's BPE engine
// unless `native` is false (then libsentencepiece encodes; tests compare the two).
std::unique_ptr<Tokenizer> load_sp_tokenizer(const fs::path& model, bool native = true);

// Replaces every invalid UTF-8 sequence by U+FFFD (maximal subparts, as Python does).
std::string sanitize_utf8(std::string_view s, size_t* replaced = nullptr);

}  // namespace tmkit
