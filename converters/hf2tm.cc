#include "hf2tm.h"

#include <chrono>
#include <deque>
#include <map>
#include <set>

#include "awq_linear.h"
#include "error.h"
#include "file_plan.h"
#include "hf_config.h"
#include "safetensors.h"
#include "turbomind.h"

namespace tmkit {

namespace {

// HF tensor names of one decoder layer. InternLM2 packs q/k/v into one `wqkv`.
struct LayerNames {
  std::string q, k, v, qkv, q_bias, k_bias, v_bias, qkv_bias, o, o_bias, gate, up, down, attn_norm, ffn_norm;
};

LayerNames layer_names(const HfConfig& c, int64_t i) {
  LayerNames n;
  if (c.arch == Arch::InternLM2) {
    const std::string p = fmt::format("model.layers.{}.", i);
    n.qkv = p + "attention.wqkv.weight";
    if (c.attn_bias) n.qkv_bias = p + "attention.wqkv.bias";
    n.o = p + "attention.wo.weight";
    if (c.attn_bias) n.o_bias = p + "attention.wo.bias";
    n.gate = p + "feed_forward.w1.weight";
    n.up = p + "feed_forward.w3.weight";
    n.down = p + "feed_forward.w2.weight";
    n.attn_norm = p + "attention_norm.weight";
    n.ffn_norm = p + "ffn_norm.weight";
    return n;
  }
  const std::string p = fmt::format("model.layers.{}.", i);
  n.q = p + "self_attn.q_proj.weight";
  n.k = p + "self_attn.k_proj.weight";
  n.v = p + "self_attn.v_proj.weight";
  if (c.attn_bias) {
    n.q_bias = p + "self_attn.q_proj.bias";
    n.k_bias = p + "self_attn.k_proj.bias";
    n.v_bias = p + "self_attn.v_proj.bias";
  }
  n.o = p + "self_attn.o_proj.weight";
  n.o_bias = p + "self_attn.o_proj.bias";  // optional (Llama attention_bias)
  n.gate = p + "mlp.gate_proj.weight";
  n.up = p + "mlp.up_proj.weight";
  n.down = p + "mlp.down_proj.weight";
  n.attn_norm = p + "input_layernorm.weight";
  n.ffn_norm = p + "post_attention_layernorm.weight";
  return n;
}

class PlanBuilder {
 public:
  PlanBuilder(const Checkpoint& ckpt, const HfConfig& hf, const TmConfig& tm)
      : ckpt_(ckpt), hf_(hf), tm_(tm), awq_(hf.awq.present) {}

  // An int4 rank file from AWQ linears (AWQ input): columns (source, column; source -1 = padding)
  // and the rows [row0, row0 + rows) of the HF linears `sources` (their base names).
  struct Int4Plan {
    std::string file;  // "layers.0.attention.w_qkv.0." + qweight / scales / zeros
    std::vector<std::string> sources;
    std::vector<int64_t> source_K, source_N;
    std::vector<std::pair<int, int64_t>> cols;
    int64_t row0 = 0, rows = 0;
  };
  std::vector<Int4Plan> int4_plans;

  std::vector<FilePlan> build() {
    const int64_t tp = tm_.tp, V = hf_.vocab, hid = hf_.hidden, Vp = tm_.vocab_padded();
    const bool internlm2 = hf_.arch == Arch::InternLM2;
    const std::string embed_name = internlm2 ? "model.tok_embeddings.weight" : "model.embed_tokens.weight";
    std::string head_name = internlm2 ? "output.weight" : "lm_head.weight";
    if (hf_.tie_word_embeddings || !ckpt_.has(head_name)) {
      if (!hf_.tie_word_embeddings) fail("{}: tensor '{}' not found", ckpt_.dir().string(), head_name);
      head_name = embed_name;
    }
    const TensorView* embed = view(embed_name, {V, hid});
    const TensorView* head = view(head_name, {V, hid});

    for (int64_t r = 0; r < tp; ++r) {  // embedding: split on the hidden dim
      FilePlan p = rows_plan(rank_file("tok_embeddings", r, "weight"), embed, 0, V, Vp, {embed_name});
      p.col_offset = r * hid / tp;
      p.cols = hid / tp;
      add(std::move(p));
    }
    for (int64_t i = 0; i < hf_.layers; ++i) add_layer(i);
    add(rows_plan("norm.weight", view("model.norm.weight", {hid}), 0, hid, hid, {"model.norm.weight"}));
    for (int64_t r = 0; r < tp; ++r)  // lm head: split on vocab rows
      add(rows_plan(rank_file("output", r, "weight"), head, r * Vp / tp, V, Vp / tp, {head_name}));
    return std::move(plans_);
  }

 private:
  const TensorView* view(const std::string& name, std::vector<int64_t> shape) {
    TensorView v = ckpt_.get(name);
    if (!is_float(v.dtype())) fail("{}: tensor '{}' has dtype {}, expected a float type", v.file, name, dtype_name(v.dtype()));
    if (v.info->shape != shape)
      fail("{}: tensor '{}' has shape [{}], expected [{}] from config.json", v.file, name,
           fmt::join(v.info->shape, ", "), fmt::join(shape, ", "));
    views_.push_back(v);
    return &views_.back();
  }

  void add(FilePlan p) { plans_.push_back(std::move(p)); }

  // `count` output rows taken from `src` rows [first, first+count) while they are < `src_rows`;
  // rows past the source are zeros. A 1-D source reads as [n, 1], so this also copies vectors.
  static FilePlan rows_plan(const std::string& file, const TensorView* src, int64_t first, int64_t src_rows,
                            int64_t count, std::vector<std::string> sources) {
    FilePlan p;
    p.file = file;
    p.sources = std::move(sources);
    for (int64_t k = 0; k < count; ++k) {
      int64_t row = first + k;
      p.rows.push_back(row < src_rows ? RowRef{src, row} : RowRef{});
    }
    p.cols = src->cols();
    return p;
  }

  // Row of head `h`, channel `t` in TurboMind order, within a block of heads starting at `base`:
  // TurboMind rotates adjacent pairs (2j, 2j+1), HF rotates halves (j, j + D/2).
  int64_t head_row(int64_t base, int64_t t, bool rotary) const {
    const int64_t D = hf_.head_dim;
    return base + (rotary ? (t % 2) * (D / 2) + t / 2 : t);
  }

  // q, k, v source rows of one rank, in the order [q_r | k_r | v_r]: (0 q | 1 k | 2 v, row).
  std::vector<std::pair<int, int64_t>> qkv_index(int64_t r) const {
    const int64_t D = hf_.head_dim, H = hf_.heads, KV = hf_.kv_heads, tp = tm_.tp, G = H / KV;
    const bool packed = hf_.arch == Arch::InternLM2;  // rows per kv head: G q heads, 1 k, 1 v
    std::vector<std::pair<int, int64_t>> rows;
    for (int64_t h = r * H / tp; h < (r + 1) * H / tp; ++h) {
      const int64_t base = packed ? ((h / G) * (G + 2) + h % G) * D : h * D;
      for (int64_t t = 0; t < D; ++t) rows.push_back({0, head_row(base, t, true)});
    }
    for (int64_t h = r * KV / tp; h < (r + 1) * KV / tp; ++h) {
      const int64_t base = packed ? (h * (G + 2) + G) * D : h * D;
      for (int64_t t = 0; t < D; ++t) rows.push_back({1, head_row(base, t, true)});
    }
    for (int64_t h = r * KV / tp; h < (r + 1) * KV / tp; ++h) {
      const int64_t base = packed ? (h * (G + 2) + G + 1) * D : h * D;
      for (int64_t t = 0; t < D; ++t) rows.push_back({2, head_row(base, t, false)});
    }
    return rows;
  }
  std::vector<RowRef> qkv_rows(int64_t r, const TensorView* q, const TensorView* k, const TensorView* v) const {
    const TensorView* parts[3] = {q, k, v};
    std::vector<RowRef> rows;
    for (auto [part, row] : qkv_index(r)) rows.push_back({parts[part], row});
    return rows;
  }


  void add_layer(int64_t i) {
    const LayerNames n = layer_names(hf_, i);
    const int64_t hid = hf_.hidden, H = hf_.heads, KV = hf_.kv_heads, D = hf_.head_dim, I = hf_.inter;
    const int64_t tp = tm_.tp, Ip = tm_.inter_size[size_t(i)];
    const std::string L = fmt::format("layers.{}.", i);

    if (awq_) return add_awq_layer(i, n);
    const TensorView *q, *k, *v, *qb = nullptr, *kb = nullptr, *vb = nullptr;
    std::vector<std::string> qkv_src, bias_src;
    if (hf_.arch == Arch::InternLM2) {
      q = k = v = view(n.qkv, {(H + 2 * KV) * D, hid});
      qkv_src = {n.qkv};
      if (hf_.attn_bias) {
        qb = kb = vb = view(n.qkv_bias, {(H + 2 * KV) * D});
        bias_src = {n.qkv_bias};
      }
    } else {
      q = view(n.q, {H * D, hid});
      k = view(n.k, {KV * D, hid});
      v = view(n.v, {KV * D, hid});
      qkv_src = {n.q, n.k, n.v};
      if (hf_.attn_bias) {
        qb = view(n.q_bias, {H * D});
        kb = view(n.k_bias, {KV * D});
        vb = view(n.v_bias, {KV * D});
        bias_src = {n.q_bias, n.k_bias, n.v_bias};
      }
    }
    const TensorView* o = view(n.o, {hid, H * D});
    const TensorView* ob = ckpt_.has(n.o_bias) ? view(n.o_bias, {hid}) : nullptr;
    const TensorView* gate = view(n.gate, {I, hid});
    const TensorView* up = view(n.up, {I, hid});
    const TensorView* down = view(n.down, {hid, I});

    add(rows_plan(L + "attention_norm.weight", view(n.attn_norm, {hid}), 0, hid, hid, {n.attn_norm}));
    for (int64_t r = 0; r < tp; ++r) {
      FilePlan p;
      p.file = rank_file(L + "attention.w_qkv", r, "weight");
      p.rows = qkv_rows(r, q, k, v);
      p.cols = hid;
      p.transpose = true;
      p.sources = qkv_src;
      add(std::move(p));
      if (qb) {
        FilePlan b;
        b.file = rank_file(L + "attention.w_qkv", r, "bias");
        b.rows = qkv_rows(r, qb, kb, vb);
        b.cols = 1;
        b.sources = bias_src;
        add(std::move(b));
      }
      FilePlan wo;  // split on input rows: this rank's heads
      wo.file = rank_file(L + "attention.wo", r, "weight");
      for (int64_t row = 0; row < hid; ++row) wo.rows.push_back({o, row});
      wo.col_offset = r * H * D / tp;
      wo.cols = H * D / tp;
      wo.transpose = true;
      wo.sources = {n.o};
      add(std::move(wo));
      add_wo_bias(L, r, ob, n.o_bias);
    }
    add(rows_plan(L + "ffn_norm.weight", view(n.ffn_norm, {hid}), 0, hid, hid, {n.ffn_norm}));
    for (int64_t r = 0; r < tp; ++r) {
      for (auto [name, src, hf_name] : {std::tuple{"w1", gate, n.gate}, std::tuple{"w3", up, n.up}}) {
        FilePlan p = rows_plan(rank_file(L + "feed_forward." + name, r, "weight"), src, r * Ip / tp, I, Ip / tp, {hf_name});
        p.transpose = true;
        add(std::move(p));
      }
      FilePlan w2;
      w2.file = rank_file(L + "feed_forward.w2", r, "weight");
      for (int64_t row = 0; row < hid; ++row) w2.rows.push_back({down, row});
      w2.col_offset = r * Ip / tp;
      w2.cols = Ip / tp;
      w2.transpose = true;
      w2.sources = {n.down};
      add(std::move(w2));
    }
  }

  // The wo bias of rank r: replicated; zeros when only q/k/v carry a bias (Qwen2); none otherwise.
  void add_wo_bias(const std::string& L, int64_t r, const TensorView* ob, const std::string& ob_name) {
    if (!hf_.attn_bias && !ob) return;
    FilePlan b;
    b.file = rank_file(L + "attention.wo", r, "bias");
    for (int64_t row = 0; row < hf_.hidden; ++row) b.rows.push_back(ob ? RowRef{ob, row} : RowRef{});
    b.cols = 1;
    if (ob) b.sources = {ob_name};
    add(std::move(b));
  }

  // AWQ input: norms and biases as float plans, the linears as Int4Plans (same rank layout as above).
  void add_awq_layer(int64_t i, const LayerNames& n) {
    if (hf_.arch == Arch::InternLM2) fail("{}: AWQ input covers the Llama family, not {}", ckpt_.dir().string(), hf_.architecture);
    const int64_t hid = hf_.hidden, H = hf_.heads, KV = hf_.kv_heads, D = hf_.head_dim, I = hf_.inter;
    const int64_t tp = tm_.tp, Ip = tm_.inter_size[size_t(i)];
    const std::string L = fmt::format("layers.{}.", i);
    auto base = [](const std::string& weight) { return weight.substr(0, weight.size() - std::string("weight").size()); };
    const int64_t g = tm_.group_size;
    if ((H * D / tp) % g)  // the input rows of wo split by rank must keep whole groups (spec §6, awq.md §9)
      fail("{}: --tp {} splits {} into {} input channels per rank, not a multiple of the AWQ group size {}",
           ckpt_.dir().string(), tp, n.o, H * D / tp, g);
    add(rows_plan(L + "attention_norm.weight", view(n.attn_norm, {hid}), 0, hid, hid, {n.attn_norm}));
    add(rows_plan(L + "ffn_norm.weight", view(n.ffn_norm, {hid}), 0, hid, hid, {n.ffn_norm}));
    const TensorView* ob = ckpt_.has(n.o_bias) ? view(n.o_bias, {hid}) : nullptr;
    for (int64_t r = 0; r < tp; ++r) {
      Int4Plan qkv{rank_file(L + "attention.w_qkv", r, ""), {base(n.q), base(n.k), base(n.v)}, {hid, hid, hid},
                   {H * D, KV * D, KV * D}, qkv_index(r), 0, hid};
      int4_plans.push_back(std::move(qkv));
      if (hf_.attn_bias) {
        FilePlan b;
        b.file = rank_file(L + "attention.w_qkv", r, "bias");
        b.rows = qkv_rows(r, view(n.q_bias, {H * D}), view(n.k_bias, {KV * D}), view(n.v_bias, {KV * D}));
        b.cols = 1;
        b.sources = {n.q_bias, n.k_bias, n.v_bias};
        add(std::move(b));
      }
      Int4Plan wo{rank_file(L + "attention.wo", r, ""), {base(n.o)}, {H * D}, {hid}, {}, r * H * D / tp, H * D / tp};
      for (int64_t c = 0; c < hid; ++c) wo.cols.push_back({0, c});
      int4_plans.push_back(std::move(wo));
      add_wo_bias(L, r, ob, n.o_bias);
      for (auto [name, hf_name] : {std::pair{"w1", n.gate}, std::pair{"w3", n.up}}) {
        Int4Plan p{rank_file(L + "feed_forward." + name, r, ""), {base(hf_name)}, {hid}, {I}, {}, 0, hid};
        for (int64_t c = r * Ip / tp; c < (r + 1) * Ip / tp; ++c) p.cols.push_back(c < I ? std::pair{0, c} : std::pair{-1, int64_t(0)});
        int4_plans.push_back(std::move(p));
      }
      Int4Plan w2{rank_file(L + "feed_forward.w2", r, ""), {base(n.down)}, {I}, {hid}, {}, r * Ip / tp, Ip / tp};
      for (int64_t c = 0; c < hid; ++c) w2.cols.push_back({0, c});
      int4_plans.push_back(std::move(w2));
    }
  }

  const Checkpoint& ckpt_;
  const HfConfig& hf_;
  const TmConfig& tm_;
  const bool awq_;  // AWQ GEMM input: the decoder linears become int4 files
  std::deque<TensorView> views_;  // stable addresses for RowRef
  std::vector<FilePlan> plans_;
};

std::string resolve_weight_type(const std::string& flag, const HfConfig& hf, const Checkpoint& ckpt) {
  if (flag == "float16" || flag == "bfloat16") return flag;
  if (flag != "auto") fail("--dtype: '{}' is not one of auto, float16, bfloat16", flag);
  std::string src = hf.dtype;
  if (src.empty() || src == "auto") {  // no dtype in config.json: look at the embedding
    const std::string e = hf.arch == Arch::InternLM2 ? "model.tok_embeddings.weight" : "model.embed_tokens.weight";
    src = ckpt.has(e) && ckpt.get(e).dtype() == DType::BF16 ? "bfloat16" : "float16";
  }
  return src == "bfloat16" ? "bfloat16" : "float16";  // fp32 sources are written as fp16
}

void copy_tokenizer(const fs::path& src, const fs::path& dst, std::vector<std::string>* files) {
  fs::create_directories(dst);
  const std::vector<fs::path> picked = hf_side_files(src);
  for (const auto& p : picked) {
    std::error_code ec;
    fs::copy_file(p, dst / p.filename(), fs::copy_options::overwrite_existing, ec);
    if (ec) fail("{}: cannot copy to {}: {}", p.string(), dst.string(), ec.message());
    files->push_back("triton_models/tokenizer/" + p.filename().string());
  }
}

// A tensor the plans do not read would be silently dropped from the workspace: refuse instead.
void check_all_tensors_used(const Checkpoint& ckpt, const HfConfig& hf, const std::vector<FilePlan>& plans,
                            std::set<std::string> used) {
  for (const auto& p : plans) used.insert(p.sources.begin(), p.sources.end());
  for (const std::string& name : ckpt.names()) {
    if (used.count(name) || name.ends_with(".rotary_emb.inv_freq")) continue;
    if (hf.tie_word_embeddings && (name == "lm_head.weight" || name == "output.weight")) continue;
    fail("{}: tensor '{}' is not used by the {} conversion (an unsupported variant?)", ckpt.dir().string(), name,
         hf.architecture);
  }
}

// AWQ input: each Int4Plan's .qweight / .scales / .zeros, from the unpacked source linears (each
// read once, dropped after its last plan).
template <typename Plans, typename Done>
void write_int4_plans(const Checkpoint& ckpt, const Plans& plans, int64_t group, const fs::path& wdir, Hf2TmReport& rep,
                      Done done) {
  std::map<std::string, size_t> last_use;
  for (size_t i = 0; i < plans.size(); ++i)
    for (const auto& b : plans[i].sources) last_use[b] = i;
  std::map<std::string, AwqLinear> open;
  for (size_t i = 0; i < plans.size(); ++i) {
    check_interrupted();
    const auto& p = plans[i];
    std::vector<const AwqLinear*> sources;
    for (size_t s = 0; s < p.sources.size(); ++s) {
      auto it = open.find(p.sources[s]);
      if (it == open.end())
        it = open.emplace(p.sources[s], read_awq_linear(ckpt, p.sources[s], p.source_K[s], p.source_N[s], group)).first;
      sources.push_back(&it->second);
    }
    const Int4Linear q = gather_int4(sources, p.cols, p.row0, p.rows, group);
    const std::pair<const char*, std::pair<const void*, size_t>> files[] = {
        {"qweight", {q.qweight.data(), q.qweight.size() * 4}},
        {"scales", {q.scales.data(), q.scales.size() * 2}},
        {"zeros", {q.zeros.data(), q.zeros.size() * 2}}};
    for (const auto& [suffix, bytes] : files) {
      write_file(wdir / (p.file + suffix), bytes.first, bytes.second);
      rep.bytes += bytes.second;
      rep.tensors += 1;
      rep.files.push_back("triton_models/weights/" + p.file + suffix);
      done(p.file + suffix);
    }
    for (const auto& b : p.sources)
      if (last_use[b] == i) {
        open.erase(b);
        for (const char* part : {"qweight", "qzeros", "scales"}) ckpt.release(b + part);
      }
  }
}

}  // namespace

std::string model_name_of(const fs::path& model_dir) {
  fs::path p = fs::absolute(model_dir).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();  // "dir/"
  return p.filename().string();
}

Hf2TmReport convert_hf_to_tm(const Hf2TmOptions& opt, const Hf2TmProgress& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  check_not_inside(opt.dst, opt.src, "--dst-path");
  const HfConfig hf = load_hf_config(opt.src);
  const fs::path config_json = opt.src / "config.json";
  if (hf.awq.present) {  // TurboMind v0.6 takes AutoAWQ GEMM, 4 bits, group 128 (spec §6.2)
    if (hf.awq.bits != 4 || hf.awq.group_size != 128 || hf.awq.version != "gemm" || !hf.awq.zero_point)
      fail("{}: quantization_config bits {}, group_size {}, version '{}', zero_point {}: TurboMind needs AWQ GEMM, 4 bits, "
           "group 128, zero points", config_json.string(), hf.awq.bits, hf.awq.group_size, hf.awq.version, hf.awq.zero_point);
    if (opt.dtype != "auto") fail("--dtype {}: an AWQ checkpoint converts to int4 (fp16 for the rest)", opt.dtype);
  }
  Checkpoint ckpt(opt.src);
  Hf2TmReport rep;
  rep.weight_type = hf.awq.present ? "int4" : resolve_weight_type(opt.dtype, hf, ckpt);
  rep.tp = opt.tp;
  TmConfig tm = make_tm_config(hf, opt.tp, rep.weight_type);
  tm.model_name = opt.model_name.empty() ? model_name_of(opt.src) : opt.model_name;
  const DType dst_type = tm.weight_dtype();

  PlanBuilder builder(ckpt, hf, tm);
  std::vector<FilePlan> plans = builder.build();
  std::set<std::string> int4_tensors;
  for (const auto& p : builder.int4_plans)
    for (const auto& b : p.sources)
      for (const char* part : {"qweight", "qzeros", "scales"}) int4_tensors.insert(b + part);
  check_all_tensors_used(ckpt, hf, plans, int4_tensors);

  // Release each source tensor's pages after the last file that reads it.
  std::map<std::string, size_t> last_use;
  for (size_t i = 0; i < plans.size(); ++i)
    for (const auto& s : plans[i].sources) last_use[s] = i;
  std::vector<std::vector<std::string>> release_after(plans.size());
  for (const auto& [name, i] : last_use) release_after[i].push_back(name);

  uint64_t total_bytes = 0;
  for (const auto& p : plans) total_bytes += p.numel() * dtype_size(dst_type);
  for (const auto& p : builder.int4_plans)  // codes at 4 bits, fp16 scale and zero per group
    total_bytes += uint64_t(p.rows) * p.cols.size() / 2 + 4 * uint64_t(p.rows / tm.group_size) * p.cols.size();
  const int64_t files_total = int64_t(plans.size() + 3 * builder.int4_plans.size());

  AtomicOutputDir out(opt.dst, opt.force);
  const fs::path wdir = weights_dir(out.tmp());
  fs::create_directories(wdir);
  for (size_t i = 0; i < plans.size(); ++i) {
    check_interrupted();
    const FilePlan& p = plans[i];
    OutputFile f(wdir / p.file);
    WriteStats st = write_file_plan(p, dst_type, f);
    f.close();
    if (st.overflow && !opt.allow_overflow)
      fail("{}: {} values exceed the float16 range (use --dtype bfloat16, or --allow-overflow to write them as inf)",
           p.sources.empty() ? p.file : p.sources.front(), st.overflow);
    rep.overflow_values += st.overflow;
    rep.bytes += st.bytes;
    rep.tensors += 1;
    rep.files.push_back("triton_models/weights/" + p.file);
    for (const auto& s : release_after[i]) ckpt.release(s);
    if (progress) progress(rep.tensors, files_total, rep.bytes, total_bytes, p.file);
  }
  write_int4_plans(ckpt, builder.int4_plans, int64_t(tm.group_size), wdir, rep, [&](const std::string& file) {
    if (progress) progress(rep.tensors, files_total, rep.bytes, total_bytes, file);
  });
  write_file(wdir / "config.yaml", format_config_yaml(tm));
  rep.files.push_back("triton_models/weights/config.yaml");
  copy_tokenizer(opt.src, tokenizer_dir(out.tmp()), &rep.files);
  out.commit();
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace tmkit
