// libFuzzer: any bytes as a tokenizer.json must load or fail with tmkit::Error, and a loaded
// tokenizer must encode and decode without crashing.
#include <cstddef>
#include <cstdint>

#include "error.h"
#include "hf_tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto tok = tmkit::parse_hf_tokenizer(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
    auto ids = tok->encode("Hello, world! 123 \xc3\xa9\xe4\xb8\xad <s> \n\n  x", true);
    tok->decode(ids);
  } catch (const tmkit::Error&) {
  }
  return 0;
}
