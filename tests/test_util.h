// Helpers shared by the tests: where shared/ and the tools are, temporary folders, running a
// tool and capturing its exit code and output.
#pragma once
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <stdexcept>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace tmkit::test {

namespace fs = std::filesystem;

inline fs::path shared_dir() {
  const char* env = std::getenv("TMKIT_SHARED");
  return fs::path(env && *env ? env : TMKIT_DEFAULT_SHARED);
}
inline fs::path model_dir(const std::string& m) { return shared_dir() / "models" / m; }
inline fs::path reference_dir(const std::string& m) { return shared_dir() / "reference" / m; }
inline std::string tool(const std::string& name) { return (fs::path(TMKIT_BIN_DIR) / name).string(); }

class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = fs::temp_directory_path() / ("tmkit-test-" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& s) const { return path_ / s; }

 private:
  fs::path path_;
};

struct RunResult {
  int code = -1;
  std::string out, err;
};

inline std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs `cmd` through the shell with stdout and stderr captured separately.
inline RunResult run(const std::string& cmd) {
  TempDir tmp;
  const std::string full = cmd + " >" + (tmp / "out").string() + " 2>" + (tmp / "err").string();
  int status = std::system(full.c_str());
  RunResult r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(tmp / "out");
  r.err = slurp(tmp / "err");
  return r;
}

// Every file under `root` by relative path, with its bytes.
inline std::map<std::string, std::string> files_of(const fs::path& root) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(root))
    if (e.is_regular_file()) out[fs::relative(e.path(), root).generic_string()] = slurp(e.path());
  return out;
}

inline std::string q(const fs::path& p) { return "'" + p.string() + "'"; }

// The message of the tmkit::Error that `f` throws, or "" when it throws none.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

template <typename T>
std::vector<T> read_array(const fs::path& p) {
  std::string s = slurp(p);
  std::vector<T> v(s.size() / sizeof(T));
  std::memcpy(v.data(), s.data(), v.size() * sizeof(T));
  return v;
}

// A synthetic Llama (hf-synth: MHA, hidden 128, 2 layers, vocab 256) whose intermediate size 200
// does not split into AWQ groups of 128, and 4 x 64 calibration ids for it.
inline std::vector<int32_t> indivisible_model(const fs::path& dir) {
  if (run(tool("hf-synth") + " --out " + q(dir) + " --hidden 128 --layers 2 --heads 2 --inter 200 --vocab 256 --dtype float16")
          .code != 0)
    throw std::runtime_error("hf-synth failed");
  std::vector<int32_t> ids(4 * 64);
  uint64_t x = 5;
  for (int32_t& id : ids) id = int32_t((x = x * 6364136223846793005ull + 1442695040888963407ull) >> 56);  // < 256
  return ids;
}

inline double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += double(a[i] - b[i]) * double(a[i] - b[i]);
    den += double(b[i]) * double(b[i]);
  }
  return std::sqrt(num / den);
}

}  // namespace tmkit::test
