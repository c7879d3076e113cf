// SHA-256 (FIPS 180-4) of byte strings and files, for the release manifest and tm-verify.
#pragma once
#include <array>
#include <cstdint>
#include <string>

#include "file_io.h"

namespace tmkit {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  std::array<uint8_t, 32> digest();  // ends the hash; call once
  std::string hex();                 // digest() as 64 lowercase hex digits

 private:
  void block(const uint8_t* p);
  std::array<uint32_t, 8> h_;
  std::array<uint8_t, 64> buf_{};
  size_t fill_ = 0;
  uint64_t bytes_ = 0;
};

std::string sha256_hex(const std::string& bytes);
// Streams the file through the hash (a memory map, released as it goes).
std::string sha256_file(const fs::path& path);

}  // namespace tmkit
