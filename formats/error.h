// tmkit's one error type: every failure that reaches a user is a tmkit::Error whose message
// names the file, tensor or flag at fault, in one line.
#pragma once
#include <fmt/format.h>
#include <new>
#include <stdexcept>
#include <string>

namespace tmkit {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

// The line a tool prints for an exception that reached main(): its message, or, for a failed
// allocation (whose what() is only "std::bad_alloc"), what happened.
inline std::string error_message(const std::exception& e) {
  if (dynamic_cast<const std::bad_alloc*>(&e)) return "out of host memory (an allocation failed)";
  return e.what();
}

}  // namespace tmkit
