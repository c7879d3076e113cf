// Files in and out: read-only memory maps, whole-file reads, and atomic outputs.
// Every output of tmkit is built in a temporary sibling of its destination and renamed into
// place only on success, so a failed or interrupted run never leaves a half-written result.
#pragma once
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

namespace tmkit {

namespace fs = std::filesystem;

class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const fs::path& path);
  ~MappedFile();
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const fs::path& path() const { return path_; }
  // Drops the pages of [offset, offset+len) from this process (they stay in the page cache),
  // which keeps resident memory bounded while streaming through a large file.
  void release(uint64_t offset, uint64_t len) const;

 private:
  fs::path path_;
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

std::string read_text_file(const fs::path& path, uint64_t max_bytes = 64ull << 20);

// A file written through a buffer; fails with the file's name on any short write.
class OutputFile {
 public:
  explicit OutputFile(const fs::path& path);
  ~OutputFile();
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;
  void write(const void* data, size_t n);
  void close();
  uint64_t bytes_written() const { return written_; }

 private:
  fs::path path_;
  int fd_ = -1;
  uint64_t written_ = 0;
};

void write_file(const fs::path& path, const void* data, size_t n);
inline void write_file(const fs::path& path, const std::string& s) { write_file(path, s.data(), s.size()); }

// Writes go into tmp(), a fresh directory beside `dest`; commit() renames it to `dest`
// (replacing an existing `dest` only when `overwrite`); otherwise the destructor removes it.
// A fresh hidden name next to `dest` (".<name>.<tag>-<random>") that does not exist yet.
fs::path unique_sibling(const fs::path& dest, const char* tag);

// Refuses (naming `flag`) an output folder that is, or contains, the input folder: --force must
// never replace what is being read.
void check_not_inside(const fs::path& dst, const fs::path& src, const std::string& flag);

// Recreates the files of `src` under `dst` (which must exist) as hard links, or copies where the
// file system cannot link, except those whose path relative to `src` `skip` returns true for.
// The caller must never write into a mirrored file (it is shared with `src`): replace it instead.
void mirror_tree(const fs::path& src, const fs::path& dst, const std::function<bool(const fs::path&)>& skip);

// Renames the folder `from` to `dest`. An existing `dest` is refused unless `overwrite`; then it
// is moved aside first and removed only once `from` is in place (restored if the rename fails).
void move_into_place(const fs::path& from, const fs::path& dest, bool overwrite);

class AtomicOutputDir {
 public:
  AtomicOutputDir(const fs::path& dest, bool overwrite);
  ~AtomicOutputDir();
  AtomicOutputDir(const AtomicOutputDir&) = delete;
  AtomicOutputDir& operator=(const AtomicOutputDir&) = delete;
  const fs::path& tmp() const { return tmp_; }
  void commit();

 private:
  fs::path dest_, tmp_;
  bool overwrite_, committed_ = false;
};

// Same for one file: write to tmp(), then commit().
class AtomicOutputFile {
 public:
  AtomicOutputFile(const fs::path& dest, bool overwrite);
  ~AtomicOutputFile();
  AtomicOutputFile(const AtomicOutputFile&) = delete;
  AtomicOutputFile& operator=(const AtomicOutputFile&) = delete;
  const fs::path& tmp() const { return tmp_; }
  void commit();

 private:
  fs::path dest_, tmp_;
  bool overwrite_, committed_ = false;
};

// Set by SIGINT/SIGTERM once install_interrupt_handler() ran; long loops call
// check_interrupted(), which throws, so that temporary outputs are cleaned up on the way out.
void install_interrupt_handler();
void check_interrupted();

}  // namespace tmkit
