// safetensors checkpoints: a validating memory-mapped reader (single file or sharded through
// model.safetensors.index.json) and a streaming writer (optionally sharded, with an index).
//
// File layout: u64 little-endian header length N, N bytes of JSON
//   {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}
// then the data area; offsets are relative to the start of the data area.
// Nothing read from a file is trusted: every size, offset, name and dtype is checked before use.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dtype.h"
#include "file_io.h"

namespace tmkit {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte span inside the data area
  int64_t numel() const;
};

// A tensor's bytes in a mapped file. 2-D accessors treat a tensor as [rows, cols]
// with cols = the last dim (a 1-D tensor is [n, 1] so that elements can be gathered as rows).
struct TensorView {
  const TensorInfo* info = nullptr;
  const uint8_t* data = nullptr;
  std::string file;  // for messages
  int64_t rows() const;
  int64_t cols() const;
  DType dtype() const { return info->dtype; }
  const std::string& name() const { return info->name; }
};

class SafetensorsFile {
 public:
  static constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
  explicit SafetensorsFile(const fs::path& path);
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorInfo* find(const std::string& name) const;
  TensorView view(const TensorInfo& t) const;
  void release(const TensorInfo& t) const { file_.release(data_offset_ + t.begin, t.end - t.begin); }
  const fs::path& path() const { return file_.path(); }

 private:
  MappedFile file_;
  uint64_t data_offset_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> by_name_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a model folder: `model.safetensors`, or the shards named by
// `model.safetensors.index.json` (names must be plain file names inside the folder).
class Checkpoint {
 public:
  explicit Checkpoint(const fs::path& dir);
  bool has(const std::string& name) const { return where_.count(name) != 0; }
  TensorView get(const std::string& name) const;  // throws naming the tensor and folder
  void release(const std::string& name) const;
  std::vector<std::string> names() const;
  const fs::path& dir() const { return dir_; }

 private:
  fs::path dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<size_t, const TensorInfo*>> where_;
};

// Streaming writer: tensors are declared up front (so the header can be written first) and
// their bytes produced one at a time by `fill(index, buffer)`; no whole model is ever in memory.
struct TensorSpec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t nbytes() const;
};
using TensorFiller = std::function<void(size_t index, uint8_t* dst)>;

// Writes one file. Tensors are laid out in the order given.
void write_safetensors(const fs::path& path, const std::vector<TensorSpec>& specs, const TensorFiller& fill,
                       const std::map<std::string, std::string>& metadata = {});

// Writes `model.safetensors` when everything fits in `max_shard_bytes`, else
// `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`, into `dir`.
// Returns the file names written.
std::vector<std::string> write_checkpoint(const fs::path& dir, const std::vector<TensorSpec>& specs,
                                          const TensorFiller& fill, uint64_t max_shard_bytes,
                                          const std::map<std::string, std::string>& metadata = {});

}  // namespace tmkit
