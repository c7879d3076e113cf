// JSON parsing with a nesting limit: a small file of "[[[[...]]]]" must not cost gigabytes.
#pragma once
#include <nlohmann/json.hpp>
#include <string_view>

#include "error.h"

namespace tmkit {

inline nlohmann::json parse_json(std::string_view text, int max_depth, const std::string& where) {
  auto limit = [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
    if (depth > max_depth) fail("{}: JSON nested deeper than {} levels", where, max_depth);
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), limit);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON: {}", where, e.what());
  }
}

}  // namespace tmkit
