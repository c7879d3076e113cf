// tmkit's one error type: every failure that reaches a user is a tmkit::Error whose message
// names the file, tensor or flag at fault, in one line.
#pragma once
#include <fmt/format.h>
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

}  // namespace tmkit
