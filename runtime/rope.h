// Rotary embedding frequencies with the scalings TurboMind supports, computed as Hugging Face
// transformers does (inv_freq in fp32), so the oracle reproduces the reference logits.
#pragma once
#include <vector>

#include "hf_config.h"

namespace tmkit {

struct RopeTable {
  std::vector<float> inv_freq;  // D/2 entries
  float attention_scaling = 1.0f;  // multiplies cos and sin (yarn)
};

// `seq_len`: the length of the sequence being processed (dynamic NTK rescales beyond
// `max_position_embeddings`).
RopeTable rope_table(const RopeConfig& rope, int64_t dim, int64_t max_position_embeddings, int64_t seq_len);

}  // namespace tmkit
