#include "sp_model.h"

#include <cstring>

#include "error.h"

namespace tmkit {

namespace {

// Protobuf wire format: varint keys (field << 3 | wire type), varints, 32-bit, length-delimited.
struct Wire {
  std::string_view s;
  const std::string& where;
  size_t pos = 0;

  bool done() const { return pos >= s.size(); }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos >= s.size()) fail("{}: truncated protobuf varint", where);
      const uint8_t b = uint8_t(s[pos++]);
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    fail("{}: protobuf varint too long", where);
  }
  std::string_view bytes() {
    const uint64_t n = varint();
    if (n > s.size() - pos) fail("{}: protobuf field runs past the end", where);
    std::string_view out = s.substr(pos, n);
    pos += n;
    return out;
  }
  float fixed32() {
    if (s.size() - pos < 4) fail("{}: truncated protobuf float", where);
    float f;
    std::memcpy(&f, s.data() + pos, 4);
    pos += 4;
    return f;
  }
  void skip(int wire_type) {
    switch (wire_type) {
      case 0: varint(); break;
      case 1: if (s.size() - pos < 8) fail("{}: truncated protobuf field", where); pos += 8; break;
      case 2: bytes(); break;
      case 5: fixed32(); break;
      default: fail("{}: unsupported protobuf wire type {}", where, wire_type);
    }
  }
};

}  // namespace

SpModel parse_sp_model(std::string_view data, const std::string& where) {
  SpModel m;
  Wire top{data, where};
  while (!top.done()) {
    const uint64_t key = top.varint();
    const int field = int(key >> 3), wt = int(key & 7);
    if (field == 1 && wt == 2) {  // repeated SentencePiece pieces
      Wire p{top.bytes(), where};
      SpModel::Piece piece;
      while (!p.done()) {
        const uint64_t k = p.varint();
        if ((k >> 3) == 1 && (k & 7) == 2) piece.text = std::string(p.bytes());
        else if ((k >> 3) == 2 && (k & 7) == 5) piece.score = p.fixed32();
        else if ((k >> 3) == 3 && (k & 7) == 0) piece.type = int(p.varint());
        else p.skip(int(k & 7));
      }
      m.pieces.push_back(std::move(piece));
    } else if (field == 2 && wt == 2) {  // TrainerSpec
      Wire t{top.bytes(), where};
      while (!t.done()) {
        const uint64_t k = t.varint();
        if ((k >> 3) == 3 && (k & 7) == 0) m.model_type = int(t.varint());
        else if ((k >> 3) == 35 && (k & 7) == 0) m.byte_fallback = t.varint() != 0;
        else if ((k >> 3) == 24 && (k & 7) == 0) m.treat_whitespace_as_suffix = t.varint() != 0;
        else if ((k >> 3) == 22 && (k & 7) == 0) m.split_by_whitespace = t.varint() != 0;
        else t.skip(int(k & 7));
      }
    } else if (field == 3 && wt == 2) {  // NormalizerSpec
      Wire n{top.bytes(), where};
      while (!n.done()) {
        const uint64_t k = n.varint();
        const int f = int(k >> 3), w = int(k & 7);
        if (f == 1 && w == 2) m.normalizer_name = std::string(n.bytes());
        else if (f == 2 && w == 2) m.has_charsmap = !n.bytes().empty();
        else if (f == 3 && w == 0) m.add_dummy_prefix = n.varint() != 0;
        else if (f == 4 && w == 0) m.remove_extra_whitespaces = n.varint() != 0;
        else if (f == 5 && w == 0) m.escape_whitespaces = n.varint() != 0;
        else n.skip(w);
      }
    } else {
      top.skip(wt);
    }
  }
  if (m.pieces.empty()) fail("{}: no pieces in the SentencePiece model", where);
  return m;
}

}  // namespace tmkit
