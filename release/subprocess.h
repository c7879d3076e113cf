// Running tmkit's own executables as steps of a pipeline: argv in, exit status out, stdout and
// stderr to files. The child dies with its parent (a killed pipeline leaves no step running on).
#pragma once
#include <string>
#include <vector>

#include "file_io.h"

namespace tmkit {

struct ProcessResult {
  int status = 0;          // the exit code, or 128 + signal when a signal ended the child
  std::string error_tail;  // the last lines of its stderr, for the one-line failure message
};

// Runs argv[0] (a path) with `cwd` as working directory, stdout into `stdout_file`, stderr into
// `stderr_file`; waits for it. Fails only when it cannot be started.
ProcessResult run_process(const std::vector<std::string>& argv, const fs::path& cwd, const fs::path& stdout_file,
                          const fs::path& stderr_file);

// The folder holding this executable (where its sibling tools live).
fs::path own_bin_dir();

}  // namespace tmkit
