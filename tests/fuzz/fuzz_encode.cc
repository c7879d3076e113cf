// libFuzzer: any bytes through the shared models' tokenizers (byte-level BPE, SentencePiece,
// SentencePiece-style tokenizer.json). Ids stay in the vocabulary; byte-level BPE round-trips
// exactly what sanitize_utf8 keeps of the input; tmkit's SentencePiece BPE equals libsentencepiece.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "tokenizer.h"

namespace {
std::vector<std::unique_ptr<tmkit::Tokenizer>> g_tokenizers;
std::unique_ptr<tmkit::Tokenizer> g_sp_library;  // libsentencepiece: the judge of tmkit's own SentencePiece BPE
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* shared = std::getenv("TMKIT_SHARED");
  const std::string root = shared ? shared : TMKIT_DEFAULT_SHARED;
  g_tokenizers.push_back(tmkit::load_tokenizer(root + "/models/small-llama"));
  g_tokenizers.push_back(tmkit::load_tokenizer(root + "/models/tiny-llama"));
  g_tokenizers.push_back(tmkit::load_tokenizer(std::string(TMKIT_SOURCE_DIR) + "/tests/data/tiny-llama-legacy.tokenizer.json"));
  g_sp_library = tmkit::load_sp_tokenizer(root + "/models/tiny-llama/tokenizer.model", false);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto& tok = g_tokenizers[data[0] % g_tokenizers.size()];
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  const bool add_special = data[0] & 8;  // round trips hold only without BOS/EOS
  const auto ids = tok->encode(text, add_special);
  for (int32_t id : ids)
    if (id < 0 || id >= tok->vocab_size()) std::abort();
  const std::string back = tok->decode(ids);
  if (!add_special && tok->kind() == "bpe-bytelevel" && back != tmkit::sanitize_utf8(text)) std::abort();
  if (tok->kind() == "sentencepiece" && ids != g_sp_library->encode(text, add_special)) std::abort();
  return 0;
}
