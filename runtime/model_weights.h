// A TurboMind workspace loaded for the CPU oracle: every rank merged back into whole fp32
// matrices, still in TurboMind's layout (linears [in, out], q/k channels in interleaved
// rotary pairs, vocab and inter_size padding kept as the zero rows/columns they are).
#pragma once
#include <Eigen/Core>
#include <optional>
#include <vector>

#include "int4.h"
#include "turbomind.h"

namespace tmkit {

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vec = Eigen::VectorXf;

struct LayerWeights {
  Vec attn_norm, ffn_norm;
  Mat wq, wk, wv;  // [hid, H*D], [hid, KV*D], [hid, KV*D]
  Vec bq, bk, bv;  // empty unless attn_bias
  Mat wo;          // [H*D, hid]
  Vec bo;          // empty unless present
  Mat w1, w3;      // [hid, I_pad]
  Mat w2;          // [I_pad, hid]
  // int4 workspaces only: the packed weights, ranks merged, fused as the GPU runs them:
  // qkv4 = [q | k | v] [hid, (H + 2 KV) D], wo4, w13_4 = [w1 | w3] [hid, 2 I_pad], w2_4.
  std::optional<Int4Linear> qkv4, wo4, w13_4, w2_4;
};

struct ModelWeights {
  TmConfig cfg;
  Mat embed;   // [V_pad, hid]
  Mat output;  // [V_pad, hid]
  Vec norm;
  std::vector<LayerWeights> layers;
};

// What the weights are loaded for. The CPU oracle runs every linear in fp32; the GPU runs an int4
// workspace's linears from their packed form, so kGpu leaves those linears' dense matrices empty
// (dequantizing them took most of the load time of a 7B model: ~90 of 130 s).
enum class LoadFor { kCpu, kGpu };

// Loads any tp and any float weight type; every file must exist with exactly the expected size.
ModelWeights load_workspace(const fs::path& workspace, LoadFor use = LoadFor::kCpu);

}  // namespace tmkit
