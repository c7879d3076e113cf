#include "safetensors.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "error.h"
#include "json_limits.h"

namespace tmkit {

using json = nlohmann::json;

namespace {
constexpr int64_t kMaxDim = int64_t(1) << 40;

bool checked_numel(const std::vector<int64_t>& shape, int64_t* out) {
  int64_t n = 1;
  for (int64_t d : shape)
    if (d < 0 || d > kMaxDim || __builtin_mul_overflow(n, d, &n)) return false;
  *out = n;
  return true;
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

bool is_plain_file_name(const std::string& s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos &&
         s.find('\\') == std::string::npos && s.find('\0') == std::string::npos;
}
}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t TensorView::rows() const {
  if (info->shape.empty()) return 1;
  return info->shape.size() == 1 ? info->shape[0] : info->numel() / std::max<int64_t>(1, info->shape.back());
}

int64_t TensorView::cols() const { return info->shape.size() <= 1 ? 1 : info->shape.back(); }

SafetensorsFile::SafetensorsFile(const fs::path& path) : file_(path) {
  const std::string where = path.string();
  if (file_.size() < 8) fail("{}: truncated safetensors file ({} bytes, no header length)", where, file_.size());
  uint64_t n = read_u64_le(file_.data());
  if (n > kMaxHeaderBytes) fail("{}: header length {} exceeds the {} byte limit", where, n, kMaxHeaderBytes);
  if (n > file_.size() - 8) fail("{}: header length {} runs past the end of the {} byte file", where, n, file_.size());
  data_offset_ = 8 + n;
  const uint64_t data_size = file_.size() - data_offset_;

  // Depth 3: {name: {"shape": [..]}}; anything deeper is not a safetensors header.
  const json header = parse_json(std::string_view(reinterpret_cast<const char*>(file_.data()) + 8, n), 3, where + ": header");
  if (!header.is_object()) fail("{}: header is not a JSON object", where);

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail("{}: __metadata__ is not an object", where);
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) fail("{}: __metadata__ value of '{}' is not a string", where, m.key());
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      fail("{}: tensor '{}': entry needs dtype, shape and data_offsets", where, name);
    TensorInfo t;
    t.name = name;
    const json& dt = v["dtype"];
    if (!dt.is_string() || !parse_dtype(dt.get<std::string>(), &t.dtype))
      fail("{}: tensor '{}': unsupported dtype {}", where, name, dt.dump());
    const json& shape = v["shape"];
    if (!shape.is_array()) fail("{}: tensor '{}': shape is not an array", where, name);
    for (const json& d : shape) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        fail("{}: tensor '{}': shape {} has a bad dimension", where, name, shape.dump());
      t.shape.push_back(d.get<int64_t>());
    }
    const json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail("{}: tensor '{}': data_offsets must be two non-negative integers", where, name);
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    if (t.begin > t.end || t.end > data_size)
      fail("{}: tensor '{}': data span [{}, {}) lies outside the {} byte data area", where, name, t.begin, t.end,
           data_size);
    int64_t numel = 0;
    uint64_t nbytes = 0;
    if (!checked_numel(t.shape, &numel) ||
        __builtin_mul_overflow(uint64_t(numel), uint64_t(dtype_size(t.dtype)), &nbytes) || nbytes != t.end - t.begin)
      fail("{}: tensor '{}': shape {} of {} needs {} bytes but its span has {}", where, name, shape.dump(),
           dtype_name(t.dtype), numel * int64_t(dtype_size(t.dtype)), t.end - t.begin);
    tensors_.push_back(std::move(t));
  }

  std::vector<const TensorInfo*> order;
  for (const auto& t : tensors_) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin < b->begin || (a->begin == b->begin && a->end < b->end); });
  for (size_t i = 1; i < order.size(); ++i)
    if (order[i]->begin < order[i - 1]->end)
      fail("{}: tensors '{}' and '{}' overlap", where, order[i - 1]->name, order[i]->name);
  for (size_t i = 0; i < tensors_.size(); ++i) by_name_[tensors_[i].name] = i;
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

TensorView SafetensorsFile::view(const TensorInfo& t) const {
  return TensorView{&t, file_.data() + data_offset_ + t.begin, file_.path().string()};
}

Checkpoint::Checkpoint(const fs::path& dir) : dir_(dir) {
  if (!fs::is_directory(dir)) fail("{}: not a directory", dir.string());
  const fs::path index = dir / "model.safetensors.index.json";
  const fs::path single = dir / "model.safetensors";
  std::set<std::string> shard_set;
  std::vector<std::string> shards;
  json weight_map;
  if (fs::exists(index)) {
    const json j = parse_json(read_text_file(index), 4, index.string());
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail("{}: missing the weight_map object", index.string());
    weight_map = j["weight_map"];
    for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
      if (!it.value().is_string()) fail("{}: weight_map entry '{}' is not a string", index.string(), it.key());
      const std::string shard = it.value().get<std::string>();
      if (!is_plain_file_name(shard))
        fail("{}: shard name '{}' of tensor '{}' leaves the model folder", index.string(), shard, it.key());
      shard_set.insert(shard);
    }
    shards.assign(shard_set.begin(), shard_set.end());
  } else if (fs::exists(single)) {
    shards.push_back("model.safetensors");
  } else {
    fail("{}: no model.safetensors or model.safetensors.index.json", dir.string());
  }

  for (const auto& shard : shards) {
    files_.push_back(std::make_unique<SafetensorsFile>(dir / shard));
    const size_t fi = files_.size() - 1;
    for (const auto& t : files_.back()->tensors()) {
      if (!where_.emplace(t.name, std::make_pair(fi, &t)).second)
        fail("{}: tensor '{}' appears in more than one shard", (dir / shard).string(), t.name);
    }
  }
  for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
    auto w = where_.find(it.key());
    if (w == where_.end() || files_[w->second.first]->path().filename() != it.value().get<std::string>())
      fail("{}: tensor '{}' is not in shard '{}'", index.string(), it.key(), it.value().get<std::string>());
  }
}

TensorView Checkpoint::get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail("{}: tensor '{}' not found", dir_.string(), name);
  return files_[it->second.first]->view(*it->second.second);
}

void Checkpoint::release(const std::string& name) const {
  auto it = where_.find(name);
  if (it != where_.end()) files_[it->second.first]->release(*it->second.second);
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, _] : where_) out.push_back(name);
  return out;
}

uint64_t TensorSpec::nbytes() const {
  int64_t n = 0;
  if (!checked_numel(shape, &n)) fail("tensor '{}': bad shape", name);
  return uint64_t(n) * dtype_size(dtype);
}

void write_safetensors(const fs::path& path, const std::vector<TensorSpec>& specs, const TensorFiller& fill,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0, largest = 0;
  for (const auto& s : specs) {
    const uint64_t n = s.nbytes();
    header[s.name] = {{"dtype", dtype_name(s.dtype)}, {"shape", s.shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
    largest = std::max(largest, n);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data area 8-byte aligned
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(text.size()) >> (8 * i));

  OutputFile out(path);
  out.write(len, 8);
  out.write(text.data(), text.size());
  std::vector<uint8_t> buf(largest);
  for (size_t i = 0; i < specs.size(); ++i) {
    check_interrupted();
    fill(i, buf.data());
    out.write(buf.data(), specs[i].nbytes());
  }
  out.close();
}

std::vector<std::string> write_checkpoint(const fs::path& dir, const std::vector<TensorSpec>& specs,
                                          const TensorFiller& fill, uint64_t max_shard_bytes,
                                          const std::map<std::string, std::string>& metadata) {
  std::vector<std::vector<size_t>> shards(1);
  uint64_t shard_bytes = 0, total = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const uint64_t n = specs[i].nbytes();
    if (!shards.back().empty() && shard_bytes + n > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(i);
    shard_bytes += n;
    total += n;
  }
  std::vector<std::string> written;
  json weight_map = json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string name = shards.size() == 1 ? std::string("model.safetensors")
                                                : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards.size());
    std::vector<TensorSpec> sub;
    for (size_t i : shards[s]) {
      sub.push_back(specs[i]);
      weight_map[specs[i].name] = name;
    }
    write_safetensors(dir / name, sub, [&](size_t j, uint8_t* dst) { fill(shards[s][j], dst); }, metadata);
    written.push_back(name);
  }
  if (shards.size() > 1) {
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    write_file(dir / "model.safetensors.index.json", index.dump(2) + "\n");
    written.push_back("model.safetensors.index.json");
  }
  return written;
}

}  // namespace tmkit
