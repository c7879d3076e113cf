#include "manifest.h"

#include <algorithm>
#include <regex>

#include "error.h"
#include "sha256.h"

namespace tmkit {

using nlohmann::json;

FileTable scan_files(const fs::path& root, const fs::path& dir) {
  FileTable out;
  if (!fs::exists(dir)) return out;
  for (auto it = fs::recursive_directory_iterator(dir); it != fs::recursive_directory_iterator(); ++it) {
    const fs::file_status st = it->symlink_status();
    if (fs::is_directory(st)) continue;
    if (!fs::is_regular_file(st)) fail("{}: neither a regular file nor a folder", it->path().string());
    const std::string rel = fs::relative(it->path(), root).generic_string();
    out[rel] = {uint64_t(fs::file_size(it->path())), manifest_sha256(it->path(), rel)};
  }
  return out;
}

std::string report_text(const json& report) { return report.dump(2) + "\n"; }

std::string manifest_sha256(const fs::path& path, const std::string& relative) {
  if (relative != kReportFile) return sha256_file(path);
  // The timestamp's value (a top-level member, as report_text writes it) is emptied; every other
  // byte counts.
  static const std::regex stamp("\n  \"generated_at\": \"[^\"\\\\]*\"");
  const std::string text = read_text_file(path);
  return sha256_hex(std::regex_replace(text, stamp, "\n  \"generated_at\": \"\"", std::regex_constants::format_first_only));
}

json file_table_json(const FileTable& files) {
  json arr = json::array();
  for (const auto& [path, e] : files) arr.push_back({{"path", path}, {"size", e.size}, {"sha256", e.sha256}});
  return arr;
}

FileTable file_table_from_json(const json& j, const std::string& where) {
  static const std::regex hex64("[0-9a-f]{64}");
  if (!j.is_array()) fail("{}: \"files\" is not a list", where);
  FileTable out;
  for (const json& e : j) {
    if (!e.is_object() || !e.contains("path") || !e["path"].is_string() || !e.contains("size") ||
        !e["size"].is_number_unsigned() || !e.contains("sha256") || !e["sha256"].is_string())
      fail("{}: a file entry without path, size and sha256: {}", where, e.dump());
    const std::string p = e["path"];
    const fs::path path(p);
    if (p.empty() || path.is_absolute() ||
        std::any_of(path.begin(), path.end(), [](const fs::path& part) { return part == ".." || part == "."; }))
      fail("{}: file path {} leaves the repository", where, p);
    const std::string sha = e["sha256"];
    if (!std::regex_match(sha, hex64)) fail("{}: {} has no valid sha256", where, p);
    if (!out.emplace(p, FileEntry{e["size"].get<uint64_t>(), sha}).second) fail("{}: {} listed twice", where, p);
  }
  return out;
}

std::vector<std::string> verify_files(const fs::path& root, const FileTable& files) {
  std::vector<std::string> problems;
  for (const auto& [rel, want] : files) {
    const fs::path p = root / rel;
    std::error_code ec;
    const fs::file_status st = fs::symlink_status(p, ec);
    if (ec || !fs::exists(st)) {
      problems.push_back(fmt::format("{}: missing", rel));
      continue;
    }
    if (!fs::is_regular_file(st)) {
      problems.push_back(fmt::format("{}: not a regular file", rel));
      continue;
    }
    const uint64_t size = fs::file_size(p);
    if (size != want.size) {
      problems.push_back(fmt::format("{}: {} bytes, the manifest says {}", rel, size, want.size));
      continue;
    }
    if (manifest_sha256(p, rel) != want.sha256) problems.push_back(fmt::format("{}: sha256 differs from the manifest", rel));
  }
  return problems;
}

std::vector<std::string> verify_repository(const fs::path& repo) {
  std::vector<std::string> problems;
  const fs::path mpath = repo / kManifestFile;
  if (!fs::is_directory(repo)) return {fmt::format("{}: not a folder", repo.string())};
  if (!fs::exists(mpath)) return {fmt::format("{}: missing", mpath.string())};
  json m;
  FileTable files;
  try {
    m = json::parse(read_text_file(mpath));
    if (!m.is_object() || m.value("format", "") != "tmkit release manifest")
      fail("{}: not a tmkit release manifest", mpath.string());
    files = file_table_from_json(m.value("files", json()), mpath.string());
  } catch (const json::exception& e) {
    return {fmt::format("{}: not valid JSON ({})", mpath.string(), e.what())};
  } catch (const Error& e) {
    return {e.what()};
  }
  // Exactly the listed files: anything else (but the manifest) is a problem too.
  for (const auto& [rel, e] : scan_files(repo, repo))
    if (rel != kManifestFile && !files.count(rel)) problems.push_back(fmt::format("{}: not in the manifest", rel));
  for (const std::string& p : verify_files(repo, files)) problems.push_back(p);
  for (const char* required : {kReportFile, "README.md"})
    if (!files.count(required)) problems.push_back(fmt::format("{}: not in the manifest", required));
  // Structure: every workspace the manifest names holds its config.yaml and weights.
  const json artifacts = m.value("artifacts", json::array());
  for (const json& a : artifacts.is_array() ? artifacts : json::array()) {
    if (!a.is_object() || !a.contains("path") || !a["path"].is_string() || a.value("kind", json()) != "turbomind") continue;
    const std::string dir = a["path"];
    const std::string cfg = dir + "/triton_models/weights/config.yaml";
    if (!files.count(cfg)) problems.push_back(fmt::format("{}: workspace without {}", dir, cfg));
  }
  return problems;
}

}  // namespace tmkit
