// GpuModel in a build without CUDA.
#include "error.h"
#include "gpu_model.h"

namespace tmkit {

struct GpuModel::Impl {};

bool GpuModel::available() { return false; }
int GpuModel::device_count() { return 0; }
void gpu_start_context() {}
void gpu_kv_fake_quant(std::vector<float>&, int, int, int, int, int) { fail("no CUDA"); }
size_t gpu_kv_cache_roundtrip(const std::vector<float>&, int, int, int, int, KvMode, std::vector<float>*,
                              std::vector<float>*) {
  fail("no CUDA");
}
std::vector<float> gpu_w4a16_matmul(const Int4Linear&, const std::vector<uint16_t>&, int, int) { fail("no CUDA"); }
GpuModel::GpuModel(const ModelWeights&, const KvQuant&, int) { fail("--device cuda: this build of tmkit has no CUDA (configure with -DTMKIT_CUDA=ON)"); }
GpuModel::~GpuModel() = default;
const TmConfig& GpuModel::config() const { fail("no CUDA"); }
std::string GpuModel::device_name() const { return ""; }
int GpuModel::tp() const { return 1; }
Mat GpuModel::forward(const int32_t*, int64_t) { fail("no CUDA"); }
Mat GpuModel::forward_batch(const int32_t*, int64_t, int64_t) { fail("no CUDA"); }
void GpuModel::nll_sums(const int32_t*, int64_t, double*, double*) { fail("no CUDA"); }
void GpuModel::nll_sums_batch(const int32_t*, int64_t, int64_t, double*, double*) { fail("no CUDA"); }
KvStats GpuModel::kv_stats(const int32_t*, int64_t, int64_t) { fail("no CUDA"); }
void GpuModel::kv_histograms(const int32_t*, int64_t, int64_t, KvHistograms*) { fail("no CUDA"); }
void GpuModel::reset(int64_t, int64_t) { fail("no CUDA"); }
void GpuModel::append(const int32_t*, int64_t) { fail("no CUDA"); }
Mat GpuModel::last_logits() const { fail("no CUDA"); }
int64_t GpuModel::position() const { return 0; }
int64_t GpuModel::batch() const { return 0; }
size_t GpuModel::kv_cache_bytes() const { return 0; }
void GpuModel::synchronize() const {}

}  // namespace tmkit
