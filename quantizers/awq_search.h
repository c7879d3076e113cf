// The AWQ search (llm-awq's algorithm, ../shared/specs/awq.md §0-§4): layer by layer over
// calibration blocks, activations always from the unquantized model; per layer the four Llama
// scale groups (grid of 20, the GQA rule for o_proj), then the clip search (max_shrink 0.5, 512
// sampled tokens, q/k skipped), the quantizer in fp16 steps. The result is the scaled and clipped
// fp32 weights, which write_hf_awq quantizes (RTN on them = AWQ's final quantization).
// Two implementations make their choices by the same rules (awq_layer.h): the CPU one in Eigen
// fp32 (tests, small models, the reference) and the GPU one (awq_search_cuda.cc: fp16 GEMM inputs
// with fp32 accumulation, as the reference tools run the model, one layer on the device at a time).
#pragma once
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "file_io.h"
#include "int4.h"

namespace tmkit {

struct AwqOptions {
  int64_t group = 128;
  bool search_scale = true, clip = true;
  bool duo_scaling = false;  // AutoAWQ's variant: s = x_mean^a / (w_mean^(1-a) + 1e-4)
  int n_grid = 20;
  int64_t clip_tokens = 512;
  double max_shrink = 0.5;
  // Linears whose input channels do not split into groups stay fp16 (their groups are not searched)
  // instead of failing the run.
  bool skip_indivisible = false;
};

struct AwqLayerReport {
  int64_t layer = 0;
  // Per scale group (qkv, o, gate_up, down): the chosen ratio (-1: not searched, e.g. o_proj under
  // GQA), and the output MSE at ratio 0 (plain RTN, except with --duo-scaling) and at the choice.
  std::vector<double> ratio, loss_ratio0, loss_best;
  double clip_mean_ratio = 1.0;  // mean of max_val / org_max over the clipped groups
  double seconds = 0;
  std::vector<std::pair<std::string, double>> phases;  // GPU search: seconds per step (load, forward, ...)
};

struct AwqResult {
  // The weights that change (decoder linears, norms, and the v bias under o scaling), by HF tensor
  // name, in the HF shape, row-major fp32. The GPU search quantizes and packs the linears itself
  // (the same quantizer, bit for bit): they come in `packed` instead, by HF weight name.
  std::map<std::string, std::vector<float>> tensors;
  std::map<std::string, AwqPackedLinear> packed;
  std::vector<AwqLayerReport> layers;
  size_t peak_device_bytes = 0;  // GPU search: device memory in use at its fullest (all processes)
};

using AwqProgress = std::function<void(const AwqLayerReport&, int64_t layers)>;

// `tokens`: [blocks, seqlen] calibration ids. NaN/Inf in weights or activations fail naming the
// tensor and layer.
AwqResult awq_search_cpu(const fs::path& hf_dir, const std::vector<int32_t>& tokens, int64_t blocks, int64_t seqlen,
                         const AwqOptions& opt, const AwqProgress& progress = {});
// The same on the GPU; fails with one line in a build without CUDA or when the device lacks memory.
AwqResult awq_search_cuda(const fs::path& hf_dir, const std::vector<int32_t>& tokens, int64_t blocks, int64_t seqlen,
                          const AwqOptions& opt, const AwqProgress& progress = {});

}  // namespace tmkit
