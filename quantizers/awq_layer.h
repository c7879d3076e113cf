// What the CPU and GPU AWQ searches share (internal to quantizers/): the model's shape and the
// checks made before a search, the calibration input, one decoder layer's weights read in fp32
// (HF layout, W[out, in]), the scale candidates of §1, the argmin rule, and how a layer's result
// is stored. Both searches make their choices from these, so they differ only in arithmetic.
#pragma once
#include <string>
#include <vector>

#include "awq_search.h"
#include "cpu_forward.h"
#include "hf_config.h"
#include "rope.h"
#include "safetensors.h"

namespace tmkit {

struct AwqShape {
  HfConfig hf;
  int64_t hid = 0, H = 0, KV = 0, D = 0, I = 0, blocks = 0, seqlen = 0, T = 0;
  float scale = 1.0f;  // attention score scale
  RopeTable rope;
  double eps = 1e-6;
  // Which input widths split into quantization groups (all, unless --skip-indivisible kept some
  // linears fp16): the hidden size (q, k, v, gate, up), o_proj's, down_proj's.
  bool quant_hidden = true, quant_o = true, quant_down = true;
  bool mha = false;  // v_proj's output matches o_proj's input and output: o_proj gets a scale (§2)
  // The scale groups searched (0 q/k/v, 1 o, 2 gate/up, 3 down): those whose scaled linears are quantized.
  bool searches(int group) const {
    return group == 1 ? mha && quant_o : group == 3 ? quant_down : quant_hidden;
  }
};

// The config checks of a search (architecture, group divisibility naming the tensor, token count).
AwqShape awq_shape(const fs::path& hf_dir, size_t tokens, int64_t blocks, int64_t seqlen, const AwqOptions& opt);

// The embeddings of the calibration tokens, [T, hid] fp32; ids outside the vocabulary fail.
Mat awq_embed(const Checkpoint& ck, const AwqShape& c, const std::vector<int32_t>& tokens);

// One decoder layer in the HF layout (q/k heads rotate halves (j, j + D/2)).
struct LayerW {
  Mat q, k, v, o, gate, up, down;
  Vec bq, bk, bv, bo, attn_norm, ffn_norm;
};
// Reads layer i; NaN/Inf in a linear fails naming it and the layer.
LayerW awq_read_layer(const Checkpoint& ck, const AwqShape& c, int64_t i);

// §1: the n_grid candidate scales for a group whose inputs have mean |x| `x_mean` per channel
// (llm-awq's x_mean^a, or AutoAWQ's duo formula over the group's weights `ws`), normalized.
std::vector<Vec> awq_scale_candidates(const Vec& x_mean, const std::vector<const Mat*>& ws, const AwqOptions& opt);

// A group's choice: the candidate with the strictly lowest loss (ties keep the smaller ratio);
// fails naming the layer and group when no loss is finite. ratio -1: the group was not searched.
struct AwqScaleChoice {
  double ratio = -1, loss_ratio0 = 0, loss_best = 0;
  Vec s;
};
AwqScaleChoice awq_choose(const std::vector<double>& losses, const std::vector<Vec>& candidates, const AwqOptions& opt,
                          int64_t layer, const std::string& group);
// Appends the four groups' choices (q/k/v, o, gate/up, down) to the layer's report.
void awq_report_scales(AwqLayerReport& rep, std::initializer_list<const AwqScaleChoice*> groups);

// Scaled columns (W[:, c] *= s[c]) and rows (W[r, :] /= s[r]), in fp32 as both searches do.
void awq_scale_cols(Mat& W, const Vec& s);
void awq_unscale_rows(Mat& W, const Vec& s);

// The layer's searched tensors (linears unless the search packed them, norms, v bias) into the
// result under their HF names.
void awq_store_layer(AwqResult& r, const LayerW& w, int64_t i, bool linears = true);

// §3: every `step`-th token of T is a clip sample (512 of them for T >= 512).
inline int64_t awq_clip_step(int64_t T, const AwqOptions& opt) { return std::max<int64_t>(1, T / opt.clip_tokens); }

}  // namespace tmkit
