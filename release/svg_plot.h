// The release report's figure, drawn as plain SVG text (no plotting tool): perplexity against bits
// per weight (points with +-1 standard error bars) beside decode speed per artifact (bars).
// Deterministic: the same points give the same bytes.
#pragma once
#include <string>
#include <vector>

namespace tmkit {

struct QualityPoint {
  std::string label;
  double bits_per_weight = 0, ppl = 0, ppl_error = 0;
};
struct SpeedBar {
  std::string label;
  double tokens_per_second = 0, stddev = 0;
};

// `speed_note` replaces the bars when `speed` is empty (why nothing was measured).
std::string release_plot_svg(const std::vector<QualityPoint>& quality, const std::vector<SpeedBar>& speed,
                             const std::string& speed_title, const std::string& speed_note);

}  // namespace tmkit
