// tm-verify: recheck a release repository against its manifest (for CI gates). See README.md.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "error.h"
#include "manifest.h"

int main(int argc, char** argv) {
  std::string repo;
  bool json = false, quiet = false;
  CLI::App app{
      "tm-verify: recheck a model repository made by release-model. Every file the manifest lists must be there with\n"
      "its size and sha256, no other file may be, and the layout must hold (report.json, README.md, each workspace's\n"
      "config.yaml). Exit 0 when it verifies, 1 with one line per problem otherwise."};
  app.add_option("repo", repo, "the repository folder (holds manifest.json)")->required();
  app.add_flag("--json", json, "print {repo, ok, files, problems} on stdout");
  app.add_flag("-q,--quiet", quiet, "print nothing when it verifies");
  CLI11_PARSE(app, argc, argv);
  std::vector<std::string> problems;
  size_t files = 0;
  try {
    problems = tmkit::verify_repository(repo);
    if (problems.empty()) {
      const auto m = nlohmann::json::parse(tmkit::read_text_file(tmkit::fs::path(repo) / tmkit::kManifestFile));
      files = m["files"].size();
    }
  } catch (const std::exception& e) {
    problems.push_back(tmkit::error_message(e));
  }
  if (json) {
    fmt::print("{}\n", nlohmann::json{{"repo", repo}, {"ok", problems.empty()}, {"files", files}, {"problems", problems}}.dump(2));
  } else {
    for (const std::string& p : problems) fmt::print(stderr, "tm-verify: {}: {}\n", repo, p);
    if (problems.empty() && !quiet) fmt::print(stderr, "tm-verify: {}: OK, {} files match manifest.json\n", repo, files);
  }
  return problems.empty() ? 0 : 1;
}
