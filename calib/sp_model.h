// The parts of a SentencePiece `tokenizer.model` (a serialized ModelProto) that decide BPE
// encoding, read straight from the protobuf wire format: pieces with scores and types, the
// model type, byte fallback and the normalizer flags.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tmkit {

struct SpModel {
  enum PieceType { Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6 };
  struct Piece {
    std::string text;
    float score = 0;
    int type = Normal;
  };
  std::vector<Piece> pieces;
  int model_type = 1;  // 1 unigram, 2 bpe, 3 word, 4 char
  bool byte_fallback = false;
  std::string normalizer_name;
  bool has_charsmap = false;
  bool add_dummy_prefix = true, remove_extra_whitespaces = true, escape_whitespaces = true;
  bool treat_whitespace_as_suffix = false, split_by_whitespace = true;
};

// Throws tmkit::Error naming `where` on malformed input.
SpModel parse_sp_model(std::string_view bytes, const std::string& where);

}  // namespace tmkit
