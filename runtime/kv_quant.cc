#include "kv_quant.h"

namespace tmkit {

bool parse_kv_mode(const std::string& s, KvMode* out) {
  if (s == "fp16") *out = KvMode::kFp16;
  else if (s == "int8") *out = KvMode::kInt8;
  else if (s == "int4") *out = KvMode::kInt4;
  else return false;
  return true;
}

const char* kv_mode_name(KvMode m) { return m == KvMode::kInt8 ? "int8" : m == KvMode::kInt4 ? "int4" : "fp16"; }

}  // namespace tmkit
