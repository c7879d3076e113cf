#include "kv_stats.h"

#include <algorithm>
#include <cstring>
#include <cmath>

#include "error.h"
#include "safetensors.h"
#include "turbomind.h"

namespace tmkit {

KvStats::KvStats(int64_t n, int64_t kv_heads_, int64_t head_dim_) : kv_heads(kv_heads_), head_dim(head_dim_) {
  const size_t c = size_t(kv_heads * head_dim);
  Layer l;
  for (int i = 0; i < kStats; ++i) l.s[size_t(i)].assign(c, i % 3 == kMin ? INFINITY : -INFINITY);
  layers.assign(size_t(n), l);
}

void KvStats::observe(int64_t layer, int64_t rows, const float* k_pre, const float* k, const float* v, int64_t stride) {
  Layer& l = layers.at(size_t(layer));
  const int64_t c = kv_heads * head_dim;
  const float* m[3] = {k, k_pre, v};
  for (int w = kK; w <= kV; ++w) {
    std::vector<float>& lo = l.at(Tensor(w), kMin);
    std::vector<float>& hi = l.at(Tensor(w), kMax);
    std::vector<float>& ab = l.at(Tensor(w), kAbsmax);
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t i = 0; i < c; ++i) {
        const float x = m[w][t * stride + i];
        lo[size_t(i)] = std::min(lo[size_t(i)], x);
        hi[size_t(i)] = std::max(hi[size_t(i)], x);
        ab[size_t(i)] = std::max(ab[size_t(i)], std::abs(x));
      }
  }
  if (layer == 0) tokens += rows;
}

void KvStats::merge(const KvStats& o) {
  if (o.layers.size() != layers.size() || o.kv_heads != kv_heads || o.head_dim != head_dim)
    fail("KV statistics of different shapes cannot be merged");
  for (size_t li = 0; li < layers.size(); ++li)
    for (int i = 0; i < kStats; ++i) {
      std::vector<float>& a = layers[li].s[size_t(i)];
      const std::vector<float>& b = o.layers[li].s[size_t(i)];
      for (size_t j = 0; j < a.size(); ++j) a[j] = i % 3 == kMin ? std::min(a[j], b[j]) : std::max(a[j], b[j]);
    }
  for (Layer& l : layers) l.int4 = {};
  tokens += o.tokens;
}

KvHistograms::KvHistograms(const KvStats& ranges) : channels(ranges.kv_heads * ranges.head_dim) {
  for (const KvStats::Layer& l : ranges.layers) {
    Layer h;
    for (KvStats::Tensor t : {KvStats::kKPreRope, KvStats::kV}) {
      h.lo.insert(h.lo.end(), l.at(t, KvStats::kMin).begin(), l.at(t, KvStats::kMin).end());
      h.hi.insert(h.hi.end(), l.at(t, KvStats::kMax).begin(), l.at(t, KvStats::kMax).end());
    }
    h.counts.assign(size_t(2 * channels * kBins), 0);
    layers.push_back(std::move(h));
  }
}

void KvHistograms::observe(int64_t layer, int64_t rows, const float* k_pre, const float* v, int64_t stride) {
  Layer& h = layers.at(size_t(layer));
  for (int w = 0; w < 2; ++w)
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t c = 0; c < channels; ++c) {
        const size_t i = size_t(w * channels + c);
        const float x = (w ? v : k_pre)[t * stride + c];
        ++h.counts[i * kBins + size_t(kv_hist_bin(x, h.lo[i], h.hi[i]))];
      }
}

void KvHistograms::merge(const KvHistograms& o) {
  if (o.layers.size() != layers.size() || o.channels != channels) fail("KV histograms of different shapes cannot be merged");
  for (size_t li = 0; li < layers.size(); ++li) {
    if (o.layers[li].lo != layers[li].lo || o.layers[li].hi != layers[li].hi)
      fail("KV histograms over different ranges cannot be merged");
    for (size_t j = 0; j < layers[li].counts.size(); ++j) layers[li].counts[j] += o.layers[li].counts[j];
  }
}

namespace {

// Squared 4-bit quantization error of a histogram (values at the bin centres) for the range [a, b].
double int4_error(const uint64_t* counts, float lo, float width, float a, float b) {
  const float scale = (b - a) / 15.0f;
  double e = 0;
  for (int j = 0; j < KvHistograms::kBins; ++j) {
    if (!counts[j]) continue;
    const float x = lo + (float(j) + 0.5f) * width;
    const float q = scale > 0 ? std::fmin(std::fmax(std::nearbyint((x - a) / scale), 0.0f), 15.0f) : 0.0f;
    const double d = double(q * scale + a - x);
    e += double(counts[j]) * d * d;
  }
  return e;
}

// The least-error range inside [lo, hi]: each end moves inwards by i% of the range (i = 0..45),
// one end at a time, until neither move helps (at most 4 rounds).
std::pair<float, float> int4_range(const uint64_t* counts, float lo, float hi) {
  if (!(hi > lo)) return {lo, hi};
  const float range = hi - lo, width = range / float(KvHistograms::kBins);
  int a = 0, b = 0;  // shrink steps of each end, 1% of the range each
  auto at = [&](int i, int j) { return int4_error(counts, lo, width, lo + range * float(i) / 100, hi - range * float(j) / 100); };
  double best = at(0, 0);
  for (int round = 0; round < 4; ++round) {
    const int a0 = a, b0 = b;
    for (int i = 0; i <= 45; ++i)
      if (double e = at(i, b); e < best) best = e, a = i;
    for (int j = 0; j <= 45; ++j)
      if (double e = at(a, j); e < best) best = e, b = j;
    if (a == a0 && b == b0) break;
  }
  return {lo + range * float(a) / 100, hi - range * float(b) / 100};
}

}  // namespace

void kv_int4_ranges(const KvHistograms& hist, KvStats* stats) {
  if (hist.layers.size() != stats->layers.size() || hist.channels != stats->kv_heads * stats->head_dim)
    fail("KV histograms do not fit the statistics");
  const size_t C = size_t(hist.channels);
  for (size_t li = 0; li < hist.layers.size(); ++li) {
    const KvHistograms::Layer& h = hist.layers[li];
    std::array<std::vector<float>, 4>& r = stats->layers[li].int4;
    for (std::vector<float>& v : r) v.assign(C, 0.0f);
    for (size_t w = 0; w < 2; ++w)
      for (size_t c = 0; c < C; ++c) {
        const size_t i = w * C + c;
        const auto [a, b] = int4_range(h.counts.data() + i * KvHistograms::kBins, h.lo[i], h.hi[i]);
        r[2 * w][c] = a;
        r[2 * w + 1][c] = b;
      }
  }
}

namespace {

// A range mapped onto 2^bits codes starting at its minimum; an empty range (a channel that never
// moved, or was never observed) keeps scale 0: every value decodes to `zero`.
void static_range(float lo, float hi, int bits, float* scale, float* zero) {
  if (!(lo <= hi) || !std::isfinite(lo) || !std::isfinite(hi)) lo = hi = 0.0f;
  *scale = (hi - lo) / float((1 << bits) - 1);
  *zero = lo;
}

}  // namespace

std::vector<KvStaticLayer> kv_static_params(const KvStats& stats, int bits) {
  if (bits != 8 && bits != 4) fail("static KV scales: {} bits (8 or 4)", bits);
  std::vector<KvStaticLayer> out;
  for (const KvStats::Layer& l : stats.layers) {
    KvStaticLayer p;
    const size_t n = l.s[0].size();
    if (bits == 4 && l.int4[0].size() != n) fail("KV statistics without int4 ranges (kv_int4_ranges)");
    // int8: the observed extremes; int4: the least-squares ranges.
    const float* k_lo = bits == 4 ? l.int4[0].data() : l.at(KvStats::kKPreRope, KvStats::kMin).data();
    const float* k_hi = bits == 4 ? l.int4[1].data() : l.at(KvStats::kKPreRope, KvStats::kMax).data();
    const float* v_lo = bits == 4 ? l.int4[2].data() : l.at(KvStats::kV, KvStats::kMin).data();
    const float* v_hi = bits == 4 ? l.int4[3].data() : l.at(KvStats::kV, KvStats::kMax).data();
    for (auto* v : {&p.k_scale, &p.k_zero, &p.v_scale, &p.v_zero}) v->resize(n);
    for (size_t i = 0; i < n; ++i) {
      static_range(k_lo[i], k_hi[i], bits, &p.k_scale[i], &p.k_zero[i]);
      static_range(v_lo[i], v_hi[i], bits, &p.v_scale[i], &p.v_zero[i]);
    }
    out.push_back(std::move(p));
  }
  return out;
}

std::array<float, 4> legacy_kv_scale(const KvStats& stats, int64_t layer, int64_t rank, int64_t tp, int bits) {
  const KvStats::Layer& l = stats.layers.at(size_t(layer));
  const size_t per_rank = size_t(stats.kv_heads / tp * stats.head_dim), begin = size_t(rank) * per_rank;
  auto range = [&](const std::vector<float>& lo, const std::vector<float>& hi) {
    const float mn = *std::min_element(lo.begin() + long(begin), lo.begin() + long(begin + per_rank));
    const float mx = *std::max_element(hi.begin() + long(begin), hi.begin() + long(begin + per_rank));
    return std::pair{(mx - mn) / float((1 << bits) - 1), (mx + mn) / 2.0f};
  };
  const auto [ks, kz] = range(l.at(KvStats::kK, KvStats::kMin), l.at(KvStats::kK, KvStats::kMax));
  const auto [vs, vz] = range(l.at(KvStats::kV, KvStats::kMin), l.at(KvStats::kV, KvStats::kMax));
  return {ks, kz, vs, vz};
}

namespace {

// In KvStats::Layer::s order: tensor-major, then min, max, absmax.
constexpr const char* kStatNames[KvStats::kStats] = {"k.min",         "k.max",         "k.absmax",
                                                     "k_prerope.min", "k_prerope.max", "k_prerope.absmax",
                                                     "v.min",         "v.max",         "v.absmax"};
// The int4 ranges, [2 (lo, hi), kv_heads, head_dim] each.
constexpr const char* kInt4RangeNames[2] = {"k_prerope.int4_range", "v.int4_range"};

}  // namespace

void write_kv_stats(const fs::path& path, const KvStats& stats, const std::map<std::string, std::string>& metadata) {
  std::vector<TensorSpec> specs;
  const size_t C = size_t(stats.kv_heads * stats.head_dim);
  for (size_t li = 0; li < stats.layers.size(); ++li) {
    for (const char* name : kStatNames)
      specs.push_back({fmt::format("layers.{}.{}", li, name), DType::F32, {stats.kv_heads, stats.head_dim}});
    for (size_t r = 0; r < 4; ++r)
      if (stats.layers[li].int4[r].size() != C) fail("{}: layer {} has no int4 ranges", path.string(), li);
    for (const char* name : kInt4RangeNames)
      specs.push_back({fmt::format("layers.{}.{}", li, name), DType::F32, {2, stats.kv_heads, stats.head_dim}});
  }
  std::map<std::string, std::string> meta = metadata;
  meta["tokens"] = std::to_string(stats.tokens);
  constexpr size_t kPerLayer = KvStats::kStats + 2;
  write_safetensors(path, specs, [&](size_t i, uint8_t* dst) {
    const KvStats::Layer& l = stats.layers[i / kPerLayer];
    const size_t which = i % kPerLayer;
    if (which < KvStats::kStats) {
      std::memcpy(dst, l.s[which].data(), C * 4);
    } else {  // [lo; hi] of K before RoPE, or of V
      const size_t w = which - KvStats::kStats;
      std::memcpy(dst, l.int4[2 * w].data(), C * 4);
      std::memcpy(dst + C * 4, l.int4[2 * w + 1].data(), C * 4);
    }
  }, meta);
}

KvStats read_kv_stats(const fs::path& path, const TmConfig& cfg) {
  const SafetensorsFile f(path);
  KvStats s(cfg.num_layer, cfg.kv_head_num, cfg.size_per_head);
  for (size_t li = 0; li < s.layers.size(); ++li)
    for (int which = 0; which < KvStats::kStats; ++which) {
      const std::string name = fmt::format("layers.{}.{}", li, kStatNames[which]);
      const TensorInfo* t = f.find(name);
      if (!t) fail("{}: no tensor {}", path.string(), name);
      if (t->dtype != DType::F32 || t->shape != std::vector<int64_t>{s.kv_heads, s.head_dim})
        fail("{}: {} is not F32 [{}, {}]", path.string(), name, s.kv_heads, s.head_dim);
      std::vector<float>& v = s.layers[li].s[size_t(which)];
      std::memcpy(v.data(), f.view(*t).data, v.size() * 4);
    }
  const size_t C = size_t(s.kv_heads * s.head_dim);
  for (size_t li = 0; li < s.layers.size(); ++li)
    for (size_t w = 0; w < 2; ++w) {
      const std::string name = fmt::format("layers.{}.{}", li, kInt4RangeNames[w]);
      const TensorInfo* t = f.find(name);
      if (!t) fail("{}: no tensor {} (written by an older kv-calibrate: calibrate again)", path.string(), name);
      if (t->dtype != DType::F32 || t->shape != std::vector<int64_t>{2, s.kv_heads, s.head_dim})
        fail("{}: {} is not F32 [2, {}, {}]", path.string(), name, s.kv_heads, s.head_dim);
      const float* src = reinterpret_cast<const float*>(f.view(*t).data);
      s.layers[li].int4[2 * w].assign(src, src + C);
      s.layers[li].int4[2 * w + 1].assign(src + C, src + 2 * C);
    }
  if (auto it = f.metadata().find("tokens"); it != f.metadata().end()) s.tokens = std::stoll(it->second);
  return s;
}

void write_kv_derived(const fs::path& weights, const TmConfig& cfg, const KvStats& stats, int legacy_bits) {
  if (stats.kv_heads != cfg.kv_head_num || stats.head_dim != cfg.size_per_head || int64_t(stats.layers.size()) != cfg.num_layer)
    fail("KV statistics of {} layers x {} kv heads x {} channels do not fit the workspace ({} x {} x {})",
         stats.layers.size(), stats.kv_heads, stats.head_dim, cfg.num_layer, cfg.kv_head_num, cfg.size_per_head);
  const int64_t tp = cfg.tp, kv_r = cfg.kv_head_num / tp, D = cfg.size_per_head;
  for (int bits : {8, 4}) {
    const std::vector<KvStaticLayer> params = kv_static_params(stats, bits);
    for (int64_t li = 0; li < cfg.num_layer; ++li)
      for (int64_t r = 0; r < tp; ++r) {
        const KvStaticLayer& p = params[size_t(li)];
        std::vector<float> buf;
        for (const auto* plane : {&p.k_scale, &p.k_zero, &p.v_scale, &p.v_zero})
          buf.insert(buf.end(), plane->begin() + r * kv_r * D, plane->begin() + (r + 1) * kv_r * D);
        write_file(weights / kv_static_file(li, bits, r), buf.data(), buf.size() * 4);
      }
  }
  for (int64_t li = 0; li < cfg.num_layer; ++li)
    for (int64_t r = 0; r < tp; ++r) {
      const std::array<float, 4> s = legacy_kv_scale(stats, li, r, tp, legacy_bits);
      write_file(weights / past_kv_scale_file(li, r), s.data(), 16);
    }
}

TmConfig write_kv_calibration(const fs::path& weights, const TmConfig& cfg, const KvStats& stats,
                              const KvCalibrationFiles& opt) {
  if (opt.legacy_bits != 8 && opt.legacy_bits != 4) fail("--kv-bits must be 8 or 4, not {}", opt.legacy_bits);
  std::map<std::string, std::string> meta = {{"format", "tmkit kv statistics"},
                                             {"samples", std::to_string(opt.samples)},
                                             {"seqlen", std::to_string(opt.seqlen)}};
  if (!opt.dataset.empty()) meta["dataset"] = opt.dataset;
  write_kv_stats(weights / kKvStatsFile, stats, meta);

  write_kv_derived(weights, cfg, stats, opt.legacy_bits);
  TmConfig out = cfg;
  out.kv_calib_bits = opt.legacy_bits;
  out.kv_calib_samples = opt.samples;
  out.kv_calib_seqlen = opt.seqlen;
  return out;
}

std::vector<std::string> kv_calibration_files(const TmConfig& cfg) {
  std::vector<std::string> names = {kKvStatsFile};
  for (int64_t li = 0; li < cfg.num_layer; ++li)
    for (int64_t r = 0; r < cfg.tp; ++r) {
      for (int bits : {8, 4}) names.push_back(kv_static_file(li, bits, r));
      names.push_back(past_kv_scale_file(li, r));
    }
  return names;
}

}  // namespace tmkit
