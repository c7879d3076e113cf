#include "svg_plot.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace tmkit {

namespace {

constexpr double kPanelW = 420, kPanelH = 300, kLeft = 64, kRight = 16, kTop = 40, kBottom = 52;
constexpr const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"};

std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '&') o += "&amp;";
    else if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '"') o += "&quot;";
    else o += c;
  }
  return o;
}

// Round tick steps (1, 2, 5 x 10^k) covering [lo, hi] with about `n` ticks.
std::vector<double> ticks(double lo, double hi, int n) {
  const double raw = (hi - lo) / n, mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> t;
  for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) t.push_back(std::abs(v) < step * 1e-9 ? 0 : v);
  return t;
}

std::string num(double v) {
  std::string s = fmt::format("{:.4g}", v);
  return s;
}

void axes(std::string& svg, double x0, const std::string& title, const std::string& xlabel, const std::string& ylabel) {
  const double w = kPanelW - kLeft - kRight, h = kPanelH - kTop - kBottom;
  svg += fmt::format("<text x=\"{:.1f}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
                     x0 + kLeft + w / 2, esc(title));
  svg += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"none\" stroke=\"#333\"/>\n",
                     x0 + kLeft, kTop, w, h);
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\" font-size=\"12\">{}</text>\n", x0 + kLeft + w / 2,
                     kPanelH - 12, esc(xlabel));
  svg += fmt::format("<text x=\"14\" y=\"{:.1f}\" text-anchor=\"middle\" font-size=\"12\" transform=\"rotate(-90 {:.1f} {:.1f})\">{}</text>\n",
                     kTop + h / 2, x0 + 14, kTop + h / 2, esc(ylabel));
}

}  // namespace

std::string release_plot_svg(const std::vector<QualityPoint>& quality, const std::vector<SpeedBar>& speed,
                             const std::string& speed_title, const std::string& speed_note) {
  const double w = kPanelW - kLeft - kRight, h = kPanelH - kTop - kBottom;
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" viewBox=\"0 0 {:.0f} {:.0f}\" "
      "font-family=\"DejaVu Sans, Arial, sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      2 * kPanelW, kPanelH, 2 * kPanelW, kPanelH);

  // Left: perplexity against bits per weight. x from 0 to a round number above the widest format.
  axes(svg, 0, "Perplexity vs bits per weight", "bits per weight", "perplexity (lower is better)");
  double xmax = 1, ylo = INFINITY, yhi = -INFINITY;
  for (const QualityPoint& p : quality) {
    xmax = std::max(xmax, p.bits_per_weight);
    ylo = std::min(ylo, p.ppl - p.ppl_error);
    yhi = std::max(yhi, p.ppl + p.ppl_error);
  }
  xmax = std::ceil(xmax / 4 + 0.25) * 4;
  if (!(ylo < yhi)) ylo = yhi - 1;
  const double pad = (yhi - ylo) * 0.15 + 1e-6;
  ylo -= pad, yhi += pad;
  auto px = [&](double x) { return kLeft + x / xmax * w; };
  auto py = [&](double y) { return kTop + (yhi - y) / (yhi - ylo) * h; };
  for (double t : ticks(0, xmax, 8))
    svg += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"#ddd\"/><text x=\"{0:.1f}\" "
                       "y=\"{3:.1f}\" text-anchor=\"middle\" font-size=\"11\">{4}</text>\n",
                       px(t), kTop, kTop + h, kTop + h + 15, num(t));
  for (double t : ticks(ylo, yhi, 5))
    svg += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{1:.1f}\" stroke=\"#ddd\"/><text x=\"{3:.1f}\" "
                       "y=\"{4:.1f}\" text-anchor=\"end\" font-size=\"11\">{5}</text>\n",
                       kLeft, py(t), kLeft + w, kLeft - 5, py(t) + 4, num(t));
  for (size_t i = 0; i < quality.size(); ++i) {
    const QualityPoint& p = quality[i];
    const char* color = kColors[i % 8];
    const double x = px(p.bits_per_weight), y = py(p.ppl);
    svg += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"{3}\" stroke-width=\"1.5\"/>\n",
                       x, py(p.ppl + p.ppl_error), py(p.ppl - p.ppl_error), color);
    svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"5\" fill=\"{}\"/>\n", x, y, color);
    // Labels alternate sides so that neighbours at one bit width do not overlap.
    const bool right = x < kLeft + w * 0.5;
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"{}\" font-size=\"11\" fill=\"{}\">{} ({})</text>\n",
                       x + (right ? 9 : -9), y - 6 - 12.0 * double(i % 2), right ? "start" : "end", color, esc(p.label),
                       fmt::format("{:.3f}", p.ppl));
  }

  // Right: decode speed per artifact, horizontal bars.
  const double x0 = kPanelW;
  axes(svg, x0, speed_title, "tokens per second (higher is better)", "");
  if (speed.empty()) {
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\" font-size=\"13\" fill=\"#555\">{}</text>\n",
                       x0 + kLeft + w / 2, kTop + h / 2, esc(speed_note));
  } else {
    double vmax = 0;
    for (const SpeedBar& b : speed) vmax = std::max(vmax, b.tokens_per_second + b.stddev);
    const std::vector<double> t = ticks(0, vmax * 1.05, 5);
    const double top = std::max(vmax * 1.05, t.back());
    auto bx = [&](double v) { return x0 + kLeft + v / top * w; };
    for (double v : t)
      svg += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"#ddd\"/><text x=\"{0:.1f}\" "
                         "y=\"{3:.1f}\" text-anchor=\"middle\" font-size=\"11\">{4}</text>\n",
                         bx(v), kTop, kTop + h, kTop + h + 15, num(v));
    const double slot = h / double(speed.size()), bar = std::min(24.0, slot * 0.45);
    for (size_t i = 0; i < speed.size(); ++i) {
      const SpeedBar& b = speed[i];
      const double y = kTop + slot * (double(i) + 0.6);  // the label sits in the slot's top part
      svg += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"{}\"/>\n", bx(0), y - bar / 2,
                         bx(b.tokens_per_second) - bx(0), bar, kColors[i % 8]);
      svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"11\">{} {:.1f}</text>\n", bx(0) + 4, y - bar / 2 - 3,
                         esc(b.label), b.tokens_per_second);
    }
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace tmkit
