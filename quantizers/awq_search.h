// The AWQ search (llm-awq's algorithm, ../shared/specs/awq.md §0-§4) on the CPU, in Eigen fp32 with
// the quantizer in fp16 steps: layer by layer over calibration blocks, activations always from the
// unquantized model; per layer the four Llama scale groups (grid of 20, the GQA rule for o_proj),
// then the clip search (max_shrink 0.5, 512 sampled tokens, q/k skipped). The result is the scaled
// and clipped fp32 weights, which write_hf_awq quantizes (RTN on them = AWQ's final quantization).
// The reference for the GPU path to come; small models and tests run it directly.
#pragma once
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "file_io.h"

namespace tmkit {

struct AwqOptions {
  int64_t group = 128;
  bool search_scale = true, clip = true;
  bool duo_scaling = false;  // AutoAWQ's variant: s = x_mean^a / (w_mean^(1-a) + 1e-4)
  int n_grid = 20;
  int64_t clip_tokens = 512;
  double max_shrink = 0.5;
};

struct AwqLayerReport {
  int64_t layer = 0;
  // Per scale group (qkv, o, gate_up, down): the chosen ratio (-1: not searched, e.g. o_proj under
  // GQA), and the output MSE at ratio 0 (plain RTN, except with --duo-scaling) and at the choice.
  std::vector<double> ratio, loss_ratio0, loss_best;
  double clip_mean_ratio = 1.0;  // mean of max_val / org_max over the clipped groups
  double seconds = 0;
};

struct AwqResult {
  // The weights that change (decoder linears, norms, and the v/up biases under o/down scaling),
  // by HF tensor name, in the HF shape, row-major fp32.
  std::map<std::string, std::vector<float>> tensors;
  std::vector<AwqLayerReport> layers;
};

using AwqProgress = std::function<void(const AwqLayerReport&, int64_t layers)>;

// `tokens`: [blocks, seqlen] calibration ids. NaN/Inf in weights or activations fail naming the
// tensor and layer.
AwqResult awq_search_cpu(const fs::path& hf_dir, const std::vector<int32_t>& tokens, int64_t blocks, int64_t seqlen,
                         const AwqOptions& opt, const AwqProgress& progress = {});

}  // namespace tmkit
