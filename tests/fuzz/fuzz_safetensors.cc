// libFuzzer: any bytes as a safetensors file must parse or fail with tmkit::Error; every tensor
// the reader accepts must lie inside the file (touching its pages would fault otherwise).
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "error.h"
#include "safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/dev/shm/tmkit-fuzz-" + std::to_string(::getpid()) + ".safetensors";
  tmkit::write_file(path, data, size);
  try {
    tmkit::SafetensorsFile f(path);
    for (const auto& t : f.tensors()) {
      const auto v = f.view(t);
      volatile uint8_t sink = 0;
      for (uint64_t i = 0; i < t.end - t.begin; i += 4096) sink = sink + v.data[i];  // touch every page
    }
  } catch (const tmkit::Error&) {
  }
  return 0;
}
