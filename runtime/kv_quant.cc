#include "kv_quant.h"

#include <cstring>

#include "error.h"
#include "file_io.h"

namespace tmkit {

bool parse_kv_mode(const std::string& s, KvMode* out) {
  if (s == "fp16") *out = KvMode::kFp16;
  else if (s == "int8") *out = KvMode::kInt8;
  else if (s == "int4") *out = KvMode::kInt4;
  else return false;
  return true;
}

const char* kv_mode_name(KvMode m) { return m == KvMode::kInt8 ? "int8" : m == KvMode::kInt4 ? "int4" : "fp16"; }

KvQuant load_kv_quant(const fs::path& ws, const TmConfig& cfg, KvMode mode, bool static_scales) {
  KvQuant q(mode);
  if (!static_scales) return q;
  if (mode == KvMode::kFp16) fail("--kv-scales static needs --kv int8 or int4 (fp16 has no scales)");
  if (!cfg.kv_calib_bits)
    fail("{}: no KV calibration (run kv-calibrate on it first, or use --kv-scales dynamic)", ws.string());
  const int64_t kv_r = cfg.kv_head_num / cfg.tp, D = cfg.size_per_head, n = kv_r * D;
  for (int64_t li = 0; li < cfg.num_layer; ++li) {
    KvStaticLayer l;
    for (int64_t r = 0; r < cfg.tp; ++r) {
      const fs::path p = weights_dir(ws) / kv_static_file(li, q.bits(), r);
      if (!fs::exists(p)) fail("{}: missing static KV scale file", p.string());
      const MappedFile f(p);
      if (f.size() != uint64_t(4 * n) * 4) fail("{}: {} bytes, expected {} (fp32 [4, {}, {}])", p.string(), f.size(), 16 * n, kv_r, D);
      const float* planes = reinterpret_cast<const float*>(f.data());
      std::vector<float>* dst[4] = {&l.k_scale, &l.k_zero, &l.v_scale, &l.v_zero};
      for (int plane = 0; plane < 4; ++plane) {
        const float* src = planes + plane * n;
        const bool scale = plane % 2 == 0;
        for (int64_t c = 0; c < n; ++c)
          if (!std::isfinite(src[c]) || (scale && src[c] < 0))
            fail("{}: value {} of plane {} is not a valid {}", p.string(), c, plane, scale ? "scale" : "zero");
        dst[plane]->insert(dst[plane]->end(), src, src + n);
      }
    }
    q.layers.push_back(std::move(l));
  }
  return q;
}

}  // namespace tmkit
