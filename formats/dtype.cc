#include "dtype.h"

namespace tmkit {

namespace {
struct DTypeInfo { DType type; std::string_view name; size_t size; };
constexpr DTypeInfo kTypes[] = {
    {DType::F32, "F32", 4}, {DType::F16, "F16", 2}, {DType::BF16, "BF16", 2},
    {DType::I32, "I32", 4}, {DType::I8, "I8", 1},   {DType::U8, "U8", 1},
};
}  // namespace

size_t dtype_size(DType t) { return kTypes[int(t)].size; }
std::string_view dtype_name(DType t) { return kTypes[int(t)].name; }
bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

bool parse_dtype(std::string_view s, DType* out) {
  for (const auto& info : kTypes)
    if (info.name == s) { *out = info.type; return true; }
  return false;
}

}  // namespace tmkit
