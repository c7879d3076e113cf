// Workspaces converted once per test binary, for tests linking the converters and quantizers.
#pragma once
#include <mutex>

#include "hf2tm.h"
#include "rtn.h"
#include "test_util.h"

namespace tmkit::test {

// hf2tm of a shared model at `tp` (int4: RTN w4g128 of that float workspace, its rank files
// quantized one by one, as awq-quantize --tp writes them), made on first use.
inline fs::path cached_workspace(const std::string& model, int64_t tp, bool int4 = false) {
  static TempDir root;
  static std::recursive_mutex mu;
  std::lock_guard<std::recursive_mutex> lock(mu);
  const fs::path ws = root / (model + "-tp" + std::to_string(tp) + (int4 ? "-int4" : ""));
  if (fs::exists(ws)) return ws;
  if (int4) {
    quantize_workspace_rtn(cached_workspace(model, tp), ws, 128, false);
    return ws;
  }
  Hf2TmOptions o;
  o.src = model_dir(model);
  o.dst = ws;
  o.tp = tp;
  convert_hf_to_tm(o);
  return ws;
}

}  // namespace tmkit::test
