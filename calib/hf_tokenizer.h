// tokenizer.json (Hugging Face tokenizers) with a BPE model: byte-level (GPT-2, Llama-3, Qwen2)
// and SentencePiece-style (Metaspace / byte fallback, Llama-2 era) variants.
//
// Pipeline, as in HF tokenizers: split off added tokens -> normalizer -> pre-tokenizer (regex
// taken from the file) -> BPE merges per piece -> post-processor (templates, when asked).
// Decoding runs the file's decoder chain. Anything the file asks for that is not implemented
// fails at load time with the JSON field named.
#pragma once
#include "tokenizer.h"

namespace tmkit {

std::unique_ptr<Tokenizer> load_hf_tokenizer(const fs::path& tokenizer_json);
// The same from the file's text; `where` names it in messages.
std::unique_ptr<Tokenizer> parse_hf_tokenizer(std::string_view json_text, const std::string& where);

}  // namespace tmkit
