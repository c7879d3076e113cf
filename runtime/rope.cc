#include "rope.h"

#include <algorithm>
#include <cmath>

namespace tmkit {

RopeTable rope_table(const RopeConfig& rope, int64_t dim, int64_t max_pos, int64_t seq_len) {
  RopeTable t;
  const int64_t half = dim / 2;
  double base = rope.theta;
  if (rope.type == "dynamic" && seq_len > max_pos)
    base *= std::pow(rope.factor * double(seq_len) / double(max_pos) - (rope.factor - 1.0), double(dim) / double(dim - 2));
  t.inv_freq.resize(size_t(half));
  for (int64_t j = 0; j < half; ++j)
    t.inv_freq[size_t(j)] = 1.0f / std::pow(float(base), float(2 * j) / float(dim));

  if (rope.type == "linear") {
    for (float& f : t.inv_freq) f = float(f / rope.factor);
  } else if (rope.type == "llama3") {
    const double old_ctx = double(rope.original_max_position_embeddings);
    const double low_wavelen = old_ctx / rope.low_freq_factor, high_wavelen = old_ctx / rope.high_freq_factor;
    for (float& f : t.inv_freq) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen < high_wavelen) continue;
      if (wavelen > low_wavelen) {
        f = float(f / rope.factor);
      } else {
        const double smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor);
        f = float((1.0 - smooth) * f / rope.factor + smooth * f);
      }
    }
  } else if (rope.type == "yarn") {
    const double orig = rope.original_max_position_embeddings > 0 ? double(rope.original_max_position_embeddings) : double(max_pos);
    auto correction_dim = [&](double rot) { return dim * std::log(orig / (rot * 2 * M_PI)) / (2 * std::log(rope.theta)); };
    double low = std::max(0.0, std::floor(correction_dim(rope.beta_fast)));
    double high = std::min(double(dim - 1), std::ceil(correction_dim(rope.beta_slow)));
    if (low == high) high += 0.001;
    for (int64_t j = 0; j < half; ++j) {
      const double ramp = std::clamp((double(j) - low) / (high - low), 0.0, 1.0);
      const double extrapolation = 1.0 - ramp;
      const double f = t.inv_freq[size_t(j)];
      t.inv_freq[size_t(j)] = float(f / rope.factor * (1.0 - extrapolation) + f * extrapolation);
    }
    t.attention_scaling = float(rope.attention_factor);
  }
  return t;
}

}  // namespace tmkit
