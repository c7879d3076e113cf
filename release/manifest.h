// A release repository's manifest.json: every file of the repository (but the manifest itself)
// with its size and sha256, the tmkit version and the exact commands that made it; and the
// check that a repository still matches it (tm-verify, release-model --resume).
//
// report.json is the one file with a timestamp (generated_at): it is hashed with that value
// emptied, so two runs that made the same repository write the same manifest.
#pragma once
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "file_io.h"

namespace tmkit {

struct FileEntry {
  uint64_t size = 0;
  std::string sha256;
};
using FileTable = std::map<std::string, FileEntry>;  // path relative to the root, '/'-separated

constexpr const char* kManifestFile = "manifest.json";
constexpr const char* kReportFile = "report.json";

// Every regular file under `dir` (recursively), keyed by its path relative to `root`. Anything
// that is neither a regular file nor a folder (a link, a device) fails, naming it.
FileTable scan_files(const fs::path& root, const fs::path& dir);
// The sha256 a manifest records for `path` (report.json's with generated_at emptied).
std::string manifest_sha256(const fs::path& path, const std::string& relative);
// report.json's text as written (two-space JSON, a final newline).
std::string report_text(const nlohmann::json& report);

// The listed files that no longer match what lies under `root`, one line each (missing, another
// size, another sha256); empty when all match. Files that are not listed are not looked at.
std::vector<std::string> verify_files(const fs::path& root, const FileTable& files);

nlohmann::json file_table_json(const FileTable& files);
// Reads a table back, refusing absolute paths, "..", and malformed sizes or digests.
FileTable file_table_from_json(const nlohmann::json& j, const std::string& where);

// The whole check of a release repository: manifest.json parses, lists exactly the files present,
// every size and sha256 matches, and the structure holds (report.json, README.md, and every
// workspace the report names has its config.yaml). Returns the problems, empty when it verifies.
std::vector<std::string> verify_repository(const fs::path& repo);

}  // namespace tmkit
