// awq_search_cuda in a build without CUDA.
#include "awq_search.h"
#include "error.h"

namespace tmkit {

AwqResult awq_search_cuda(const fs::path&, const std::vector<int32_t>&, int64_t, int64_t, const AwqOptions&,
                          const AwqProgress&) {
  fail("--device cuda: this build of tmkit has no CUDA (configure with -DTMKIT_CUDA=ON), use --device cpu");
}

}  // namespace tmkit
