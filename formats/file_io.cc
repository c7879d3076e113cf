#include "file_io.h"

#include <algorithm>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <random>

#include "error.h"

namespace tmkit {

namespace {
std::string errno_text() { return std::strerror(errno); }

std::atomic<bool> g_interrupted{false};
extern "C" void on_interrupt(int) { g_interrupted.store(true); }
}  // namespace

fs::path unique_sibling(const fs::path& dest, const char* tag) {
  static std::random_device rd;
  fs::path parent = dest.parent_path().empty() ? fs::path(".") : dest.parent_path();
  for (int attempt = 0; attempt < 100; ++attempt) {
    auto p = parent / fmt::format(".{}.{}-{:08x}", dest.filename().string(), tag, rd());
    if (!fs::exists(fs::symlink_status(p))) return p;
  }
  fail("{}: cannot find a free temporary name", dest.string());
}

void check_not_inside(const fs::path& dst, const fs::path& src, const std::string& flag) {
  const fs::path d = fs::weakly_canonical(dst), s = fs::weakly_canonical(src);
  if (std::mismatch(d.begin(), d.end(), s.begin(), s.end()).first == d.end())
    fail("{} {}: is or contains the source model folder {}", flag, dst.string(), src.string());
}

MappedFile::MappedFile(const fs::path& path) : path_(path) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer; anything not regular is refused below.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail("{}: cannot open: {}", path.string(), errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: not a regular file", path.string());
  }
  size_ = uint64_t(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      fail("{}: cannot map: {}", path.string(), errno_text());
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

MappedFile::MappedFile(MappedFile&& o) noexcept
    : path_(std::move(o.path_)), data_(o.data_), size_(o.size_) {
  o.data_ = nullptr;
  o.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
    path_ = std::move(o.path_);
    data_ = o.data_;
    size_ = o.size_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

void MappedFile::release(uint64_t offset, uint64_t len) const {
  if (!data_ || len == 0) return;
  const uint64_t page = uint64_t(::sysconf(_SC_PAGESIZE));
  uint64_t begin = offset / page * page, end = std::min(size_, offset + len);
  ::madvise(const_cast<uint8_t*>(data_) + begin, end - begin, MADV_DONTNEED);
}

std::string read_text_file(const fs::path& path, uint64_t max_bytes) {
  MappedFile f(path);
  if (f.size() > max_bytes) fail("{}: file is {} bytes, more than the {} allowed", path.string(), f.size(), max_bytes);
  return std::string(reinterpret_cast<const char*>(f.data()), f.size());
}

OutputFile::OutputFile(const fs::path& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail("{}: cannot create: {}", path.string(), errno_text());
}

OutputFile::~OutputFile() {
  if (fd_ >= 0) ::close(fd_);
}

void OutputFile::write(const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd_, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail("{}: write failed: {}", path_.string(), errno_text());
    p += w;
    n -= size_t(w);
    written_ += uint64_t(w);
  }
}

void OutputFile::close() {
  if (fd_ < 0) return;
  int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) fail("{}: close failed: {}", path_.string(), errno_text());
}

void write_file(const fs::path& path, const void* data, size_t n) {
  OutputFile f(path);
  f.write(data, n);
  f.close();
}

void mirror_tree(const fs::path& src, const fs::path& dst, const std::function<bool(const fs::path&)>& skip) {
  for (const auto& e : fs::recursive_directory_iterator(src)) {
    const fs::path rel = fs::relative(e.path(), src);
    if (e.is_directory()) {
      fs::create_directories(dst / rel);
    } else if (!skip(rel)) {
      if (!e.is_regular_file()) fail("{}: not a regular file", e.path().string());
      std::error_code ec;
      fs::create_hard_link(e.path(), dst / rel, ec);
      if (ec) fs::copy_file(e.path(), dst / rel, ec);
      if (ec) fail("{}: cannot link or copy to {}: {}", e.path().string(), (dst / rel).string(), ec.message());
    }
  }
}

AtomicOutputDir::AtomicOutputDir(const fs::path& dest, bool overwrite) : dest_(dest), overwrite_(overwrite) {
  if (dest.empty()) fail("the destination path is empty");
  if (fs::exists(fs::symlink_status(dest)) && !overwrite)
    fail("{}: destination exists (use --force to replace it)", dest.string());
  tmp_ = unique_sibling(dest, "tmp");
  std::error_code ec;
  if (!fs::create_directory(tmp_, ec) || ec)
    fail("{}: cannot create the output directory {}: {}", dest.string(), tmp_.string(), ec ? ec.message() : "exists");
}

AtomicOutputDir::~AtomicOutputDir() {
  if (!committed_) {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
}

void move_into_place(const fs::path& from, const fs::path& dest, bool overwrite) {
  std::error_code ec;
  fs::path old;
  if (fs::exists(fs::symlink_status(dest))) {
    if (!overwrite) fail("{}: destination exists (use --force to replace it)", dest.string());
    old = unique_sibling(dest, "old");
    fs::rename(dest, old, ec);
    if (ec) fail("{}: cannot move the old destination aside: {}", dest.string(), ec.message());
  }
  fs::rename(from, dest, ec);
  if (ec) {
    std::error_code ignored;
    if (!old.empty()) fs::rename(old, dest, ignored);
    fail("{}: cannot rename {} into place: {}", dest.string(), from.string(), ec.message());
  }
  if (!old.empty()) fs::remove_all(old, ec);
}

void AtomicOutputDir::commit() {
  move_into_place(tmp_, dest_, overwrite_);
  committed_ = true;
}

AtomicOutputFile::AtomicOutputFile(const fs::path& dest, bool overwrite) : dest_(dest), overwrite_(overwrite) {
  if (dest.empty()) fail("the output path is empty");
  if (fs::exists(fs::symlink_status(dest)) && !overwrite)
    fail("{}: output exists (use --force to replace it)", dest.string());
  tmp_ = unique_sibling(dest, "tmp");
}

AtomicOutputFile::~AtomicOutputFile() {
  if (!committed_) {
    std::error_code ec;
    fs::remove(tmp_, ec);
  }
}

void AtomicOutputFile::commit() {
  if (!overwrite_ && fs::exists(fs::symlink_status(dest_)))  // it may have appeared while we wrote
    fail("{}: output exists (use --force to replace it)", dest_.string());
  std::error_code ec;
  fs::rename(tmp_, dest_, ec);
  if (ec) fail("{}: cannot rename {} into place: {}", dest_.string(), tmp_.string(), ec.message());
  committed_ = true;
}

void install_interrupt_handler() {
  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
}

void check_interrupted() {
  if (g_interrupted.load()) fail("interrupted");
}

}  // namespace tmkit
