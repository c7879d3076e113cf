// GpuModel with CUDA: the ranks (gpu_rank.h; one at tp 1) and what is asked of all of them.
// Tensor parallelism (tp > 1): one RankModel per device on its own host thread (rank_workers.h),
// each with rank_slice's share of the weights (tp_split.h), and an NCCL all-reduce of the fp32
// `delta` after wo and after w2, as TurboMind does; every rank then holds the same residual
// stream, and rank 0 alone runs the final norm and LM head.
#include "gpu_model.h"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdlib>
#include <thread>
#include <vector>

#include "cuda/cuda_utils.h"
#include "cuda/kernels.h"
#include "gpu_rank.h"
#include "rank_workers.h"
#include "tp_split.h"

namespace tmkit {

using cuda::DeviceBuffer;

void gpu_kv_fake_quant(std::vector<float>& qkv, int T, int H, int KV, int D, int bits) {
  DeviceBuffer<float> d(qkv.size());
  TMKIT_CUDA_CHECK(cudaMemcpy(d.get(), qkv.data(), qkv.size() * 4, cudaMemcpyHostToDevice));
  cuda::kv_fake_quant(d.get(), T, H, KV, D, bits, nullptr);
  TMKIT_CUDA_CHECK(cudaMemcpy(qkv.data(), d.get(), qkv.size() * 4, cudaMemcpyDeviceToHost));
}

size_t gpu_kv_cache_roundtrip(const std::vector<float>& qkv, int T, int H, int KV, int D, KvMode mode,
                              std::vector<float>* k, std::vector<float>* v) {
  if (qkv.size() != size_t(T) * (H + 2 * KV) * D) fail("gpu_kv_cache_roundtrip: qkv has {} values", qkv.size());
  DeviceBuffer<float> d(qkv.size());
  TMKIT_CUDA_CHECK(cudaMemcpy(d.get(), qkv.data(), qkv.size() * 4, cudaMemcpyHostToDevice));
  cuda::KvCache cache;
  const int bits = mode == KvMode::kFp16 ? 16 : int(mode);
  cache.allocate(bits, 1, 1, KV, D, T);
  const cuda::KvLayer l = cache.layer(0);
  cuda::kv_append(d.get(), 1, T, H, l, 0, nullptr, nullptr);
  // Decode what the device holds by the layout of cuda/kv_cache.h: rows (kv head, token), params apart.
  const size_t rows = size_t(KV) * T, row_bytes = l.row_bytes();
  for (int which = 0; which < 2; ++which) {
    std::vector<uint8_t> codes(rows * row_bytes);
    std::vector<uint16_t> params(bits < 16 ? rows * 2 : 0);  // (scale, zero) fp16 bits per row
    TMKIT_CUDA_CHECK(cudaMemcpy(codes.data(), which ? l.v : l.k, codes.size(), cudaMemcpyDeviceToHost));
    if (bits < 16)
      TMKIT_CUDA_CHECK(cudaMemcpy(params.data(), which ? l.v_param : l.k_param, params.size() * 2, cudaMemcpyDeviceToHost));
    std::vector<float>& out = which ? *v : *k;
    out.assign(rows * D, 0.0f);
    for (size_t r = 0; r < rows; ++r)
      for (int c = 0; c < D; ++c) {
        const uint8_t* row = codes.data() + r * row_bytes;
        if (bits == 16) {
          out[r * D + c] = half_to_float(uint16_t(row[2 * c] | row[2 * c + 1] << 8));
          continue;
        }
        const float q = float(bits == 8 ? row[c] : (row[c / 2] >> (4 * (c % 2))) & 0xf);
        const float scale = half_to_float(params[2 * r]), zero = half_to_float(params[2 * r + 1]);
        out[r * D + c] = q * scale + zero;
      }
  }
  return cache.bytes();
}


void gpu_start_context() {
  static std::thread starter([] { cudaFree(nullptr); });
  static struct Joiner {
    ~Joiner() { if (starter.joinable()) starter.join(); }
  } joiner;
}

bool GpuModel::available() { return device_count() > 0; }

int GpuModel::device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

namespace {
bool fits_fp16(const ModelWeights& w) {
  float m = std::max({w.embed.cwiseAbs().maxCoeff(), w.output.cwiseAbs().maxCoeff(), w.norm.cwiseAbs().maxCoeff()});
  for (const LayerWeights& l : w.layers)
    for (const Mat* x : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w3, &l.w2})
      if (x->size()) m = std::max(m, x->cwiseAbs().maxCoeff());  // int4 linears (fp16 scales) may be empty
  return m < 65504.0f;
}

// Rank `rank` of `tp`'s static KV parameters, one device buffer a layer (rank_slice's kv heads).
std::vector<DeviceBuffer<float>> upload_kv_static(const KvQuant& kv, const TmConfig& c, int rank, int tp) {
  std::vector<DeviceBuffer<float>> out;
  const size_t n = size_t(c.kv_head_num / tp * c.size_per_head), off = size_t(rank) * n;
  for (const KvStaticLayer& l : kv.layers) {
    std::vector<float> host;
    for (const auto* v : {&l.k_scale, &l.k_zero, &l.v_scale, &l.v_zero}) host.insert(host.end(), v->begin() + long(off), v->begin() + long(off + n));
    DeviceBuffer<float> d(host.size());
    TMKIT_CUDA_CHECK(cudaMemcpy(d.get(), host.data(), host.size() * 4, cudaMemcpyHostToDevice));
    out.push_back(std::move(d));
  }
  return out;
}
}  // namespace

// The ranks. With tp 1 the one rank runs on the caller's thread and device, as before TP; with
// tp > 1 rank r runs on worker r with device r current, for every CUDA call of it (construction,
// forward, copies, destruction).
struct GpuModel::Impl {
  TmConfig cfg;  // the whole model's
  std::string name;
  std::vector<std::unique_ptr<RankModel>> ranks;
  std::unique_ptr<RankWorkers> workers;
  std::unique_ptr<std::barrier<>> staged;
#ifdef TMKIT_HAVE_NCCL
  std::vector<ncclComm_t> comms;  // null once aborted
#endif
  std::atomic<bool> broken{false};

  RankModel& r0() const { return *ranks[0]; }
  // f(r) for every rank (or rank `only`), each on its own device, in parallel.
  void each(const std::function<void(int)>& f, int only = -1) {
    if (!workers) return f(0);
    workers->run([&](int r) {
      TMKIT_CUDA_CHECK(cudaSetDevice(r));
      f(r);
    }, only);
  }
  // One NLL-only forward with `flag` set on every rank (kv-calibrate's passes), cleared after it,
  // also when it fails.
  void run_collecting(bool RankModel::*flag, const int32_t* tokens, int64_t B, int64_t T) {
    for (auto& r : ranks) r.get()->*flag = true;
    try {
      run(tokens, B, T, /*use_cache=*/false, /*nll_only=*/true);
    } catch (...) {
      for (auto& r : ranks) r.get()->*flag = false;
      throw;
    }
    for (auto& r : ranks) r.get()->*flag = false;
  }
  void run(const int32_t* tokens, int64_t B, int64_t T, bool use_cache, bool nll_only) {
    if (!workers) {
      RankModel& m = r0();
      m.stage(tokens, B, T, use_cache, nll_only);
      m.launch();
      TMKIT_CUDA_CHECK(cudaStreamSynchronize(m.stream));
      return m.finish();
    }
    if (broken) fail("tensor parallelism: an earlier error on one rank aborted the NCCL communicators; build the model again");
    std::atomic<bool> failed{false};
    workers->run([&](int r) {
      RankModel& m = *ranks[size_t(r)];
      try {
        TMKIT_CUDA_CHECK(cudaSetDevice(r));
        m.stage(tokens, B, T, use_cache, nll_only);
      } catch (...) {
        failed = true;
        staged->arrive_and_wait();
        throw;
      }
      staged->arrive_and_wait();
      if (failed) return;
      try {
        m.launch();
        wait(r, failed);
      } catch (...) {
        failed = true;
        abort_rank(r);
        throw;
      }
      m.finish();
    });
  }
  // Waits for rank r's stream. A rank that fails after the barrier (a launch error) would leave
  // its peers in an all-reduce forever, so the wait polls the shared flag; when it is set, the
  // rank aborts its communicator (NCCL's kernels watch its abort flag and return) and fails too.
  void wait(int r, const std::atomic<bool>& failed) {
    for (;;) {
      const cudaError_t e = cudaStreamQuery(ranks[size_t(r)]->stream);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) TMKIT_CUDA_CHECK(e);
      if (failed) {
        abort_rank(r);
        TMKIT_CUDA_CHECK(cudaStreamSynchronize(ranks[size_t(r)]->stream));
        fail("tensor parallelism: rank {} stopped because another rank failed", r);
      }
      std::this_thread::yield();
    }
  }
  // On rank r's own thread: no other thread uses its communicator.
  void abort_rank(int r) {
    broken = true;
#ifdef TMKIT_HAVE_NCCL
    if (size_t(r) < comms.size() && comms[size_t(r)]) {
      ncclCommAbort(comms[size_t(r)]);
      comms[size_t(r)] = nullptr;
      ranks[size_t(r)]->comm = nullptr;
    }
#else
    (void)r;
#endif
  }
  ~Impl() {
    if (!workers) return;
    try {
      each([&](int r) {
        ranks[size_t(r)].reset();
#ifdef TMKIT_HAVE_NCCL
        // Collective within the process (ncclCommFinalize): every rank's thread at once.
        if (size_t(r) < comms.size() && comms[size_t(r)]) ncclCommDestroy(comms[size_t(r)]);
#endif
      });
    } catch (...) {  // nothing to do about a failing device at this point
    }
  }
};

GpuModel::GpuModel(const ModelWeights& w, const KvQuant& kvq, int tp) {
  const KvMode kv = kvq.mode;
  if (kvq.is_static() && int64_t(kvq.layers.size()) != w.cfg.num_layer)
    fail("static KV scales: {} layers for a model of {}", kvq.layers.size(), w.cfg.num_layer);
  if (!available()) fail("--device cuda: no CUDA device is available");
  check_tp_split(w.cfg, tp);
  auto impl = std::make_unique<Impl>();
  impl->cfg = w.cfg;
  const bool fp16 = w.cfg.weight_dtype() == DType::F16 || fits_fp16(w);  // int4 workspaces are F16
  auto make = [&](const ModelWeights& rw, int rank) -> std::unique_ptr<RankModel> {
    std::unique_ptr<RankModel> m = make_rank_model(rw, kv, rank, fp16);
    m->kv_static = upload_kv_static(kvq, w.cfg, rank, tp);
    return m;
  };
  cudaDeviceProp prop{};
  TMKIT_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const std::string type = fp16 ? "fp16" : "bf16";
  if (tp == 1) {
    impl->ranks.push_back(make(w, 0));
    impl->name = fmt::format("{}, {}", prop.name, type);
  } else {
    const int n = device_count();
    if (n < tp) fail("--tp {} needs {} CUDA devices, {} present", tp, tp, n);
#ifndef TMKIT_HAVE_NCCL
    fail("--tp {}: this build of tmkit has no NCCL (tensor parallelism needs nccl.h and libnccl at configure time)", tp);
#else
    impl->ranks.resize(size_t(tp));
    impl->workers = std::make_unique<RankWorkers>(tp);
    impl->staged = std::make_unique<std::barrier<>>(tp);
    impl->each([&](int r) { impl->ranks[size_t(r)] = make(rank_slice(w, r, tp), r); });
    // NVLink multicast (NVLS) stays off: on the shared machines it can take the host's GPUs out of
    // service. Set here, overriding the environment, before NCCL reads it.
    setenv("NCCL_NVLS_ENABLE", "0", 1);
    // Every connection at init rather than at a collective's first use, which may be inside a
    // decode graph's capture (unless the environment says otherwise).
    setenv("NCCL_RUNTIME_CONNECT", "0", 0);
    impl->comms.assign(size_t(tp), nullptr);
    int device = 0;
    TMKIT_CUDA_CHECK(cudaGetDevice(&device));
    TMKIT_NCCL_CHECK(ncclCommInitAll(impl->comms.data(), tp, nullptr));  // devices 0 .. tp-1
    TMKIT_CUDA_CHECK(cudaSetDevice(device));
    impl->each([&](int r) {
      impl->ranks[size_t(r)]->comm = impl->comms[size_t(r)];
      impl->ranks[size_t(r)]->warm_up();
    });
    impl->name = fmt::format("{} x {}, {}, tp {}", tp, prop.name, type, tp);
#endif
  }
  impl_ = std::move(impl);
}

GpuModel::~GpuModel() = default;
const TmConfig& GpuModel::config() const { return impl_->cfg; }
std::string GpuModel::device_name() const { return impl_->name; }
int GpuModel::tp() const { return int(impl_->ranks.size()); }

Mat GpuModel::forward(const int32_t* tokens, int64_t T) { return forward_batch(tokens, 1, T); }

Mat GpuModel::forward_batch(const int32_t* tokens, int64_t batch, int64_t T) {
  impl_->run(tokens, batch, T, /*use_cache=*/false, /*nll_only=*/false);
  return last_logits();
}

void GpuModel::reset(int64_t capacity, int64_t batch) {
  impl_->each([&](int r) { impl_->ranks[size_t(r)]->reset(capacity, batch); });
}
void GpuModel::append(const int32_t* tokens, int64_t T) {
  if (impl_->r0().cache_batch == 0) fail("KV cache: append() before reset()");
  impl_->run(tokens, impl_->r0().cache_batch, T, /*use_cache=*/true, /*nll_only=*/false);
}
int64_t GpuModel::position() const { return impl_->r0().cached; }
int64_t GpuModel::batch() const { return impl_->r0().cache_batch; }
size_t GpuModel::kv_cache_bytes() const {
  size_t bytes = 0;
  for (const auto& r : impl_->ranks) bytes += r->cache_bytes();
  return bytes;
}
void GpuModel::synchronize() const { impl_->each([](int) { TMKIT_CUDA_CHECK(cudaDeviceSynchronize()); }); }

Mat GpuModel::last_logits() const {
  Mat logits(impl_->r0().last_rows, impl_->cfg.vocab_size);
  impl_->each([&](int) {
    TMKIT_CUDA_CHECK(cudaMemcpy(logits.data(), impl_->r0().logits(), size_t(logits.size()) * 4, cudaMemcpyDeviceToHost));
  }, 0);
  return logits;
}

void GpuModel::nll_sums(const int32_t* tokens, int64_t T, double* sum, double* sum_sq) {
  nll_sums_batch(tokens, 1, T, sum, sum_sq);
}

void GpuModel::nll_sums_batch(const int32_t* tokens, int64_t batch, int64_t T, double* sums, double* sums_sq) {
  impl_->run(tokens, batch, T, /*use_cache=*/false, /*nll_only=*/true);
  std::vector<float> nll(size_t(batch * T - 1));
  impl_->each([&](int) {
    TMKIT_CUDA_CHECK(cudaMemcpy(nll.data(), impl_->r0().nll.get(), nll.size() * 4, cudaMemcpyDeviceToHost));
  }, 0);
  for (int64_t b = 0; b < batch; ++b) {
    sums[b] = sums_sq[b] = 0.0;
    for (int64_t t = 0; t + 1 < T; ++t) {  // row b T + t scores token t + 1 of sequence b
      const double v = nll[size_t(b * T + t)];
      sums[b] += v;
      sums_sq[b] += v * v;
    }
  }
}

KvStats GpuModel::kv_stats(const int32_t* tokens, int64_t batch, int64_t T) {
  const TmConfig& c = impl_->cfg;
  const int tp = int(impl_->ranks.size()), kv_r = int(c.kv_head_num) / tp, D = int(c.size_per_head);
  const size_t per_layer = 9 * size_t(kv_r * D);
  impl_->each([&](int r) {
    RankModel& m = *impl_->ranks[size_t(r)];
    m.kv_stats_d.resize(size_t(c.num_layer) * per_layer);
    for (int64_t li = 0; li < c.num_layer; ++li) cuda::kv_stats_init(m.kv_stats_d.get() + li * per_layer, kv_r, D, nullptr);
  });
  impl_->run_collecting(&RankModel::collect_kv_stats, tokens, batch, T);
  KvStats out(c.num_layer, c.kv_head_num, c.size_per_head);
  out.tokens = batch * T;
  impl_->each([&](int r) {
    std::vector<float> host(size_t(c.num_layer) * per_layer);
    TMKIT_CUDA_CHECK(cudaMemcpy(host.data(), impl_->ranks[size_t(r)]->kv_stats_d.get(), host.size() * 4, cudaMemcpyDeviceToHost));
    for (int64_t li = 0; li < c.num_layer; ++li)  // rank r holds kv heads r kv_r .. (r + 1) kv_r - 1
      for (int st = 0; st < KvStats::kStats; ++st)
        std::copy_n(host.data() + li * per_layer + size_t(st * kv_r * D), kv_r * D,
                    out.layers[size_t(li)].s[size_t(st)].begin() + long(r) * kv_r * D);
  });
  return out;
}

void GpuModel::kv_histograms(const int32_t* tokens, int64_t batch, int64_t T, KvHistograms* hist) {
  static_assert(cuda::kHistBins == KvHistograms::kBins);
  const TmConfig& c = impl_->cfg;
  const int tp = int(impl_->ranks.size()), kv_r = int(c.kv_head_num) / tp, D = int(c.size_per_head);
  const size_t n = size_t(kv_r * D), C = size_t(hist->channels), bins = KvHistograms::kBins;
  if (hist->layers.size() != size_t(c.num_layer) || C != size_t(c.kv_head_num * D)) fail("KV histograms do not fit the model");
  impl_->each([&](int r) {  // this rank's channels: kv heads r kv_r .. (r + 1) kv_r - 1 of K, then of V
    RankModel& m = *impl_->ranks[size_t(r)];
    std::vector<float> ranges;
    for (const KvHistograms::Layer& l : hist->layers)
      for (const std::vector<float>* v : {&l.lo, &l.hi})
        for (size_t w = 0; w < 2; ++w) ranges.insert(ranges.end(), v->begin() + long(w * C + r * n), v->begin() + long(w * C + (r + 1) * n));
    m.kv_hist_ranges.resize(ranges.size());
    TMKIT_CUDA_CHECK(cudaMemcpy(m.kv_hist_ranges.get(), ranges.data(), ranges.size() * 4, cudaMemcpyHostToDevice));
    m.kv_hist_d.resize(size_t(c.num_layer) * 2 * n * bins);
    TMKIT_CUDA_CHECK(cudaMemset(m.kv_hist_d.get(), 0, m.kv_hist_d.size() * sizeof(unsigned)));
  });
  impl_->run_collecting(&RankModel::collect_kv_hist, tokens, batch, T);
  impl_->each([&](int r) {
    std::vector<unsigned> host(size_t(c.num_layer) * 2 * n * bins);
    TMKIT_CUDA_CHECK(cudaMemcpy(host.data(), impl_->ranks[size_t(r)]->kv_hist_d.get(), host.size() * sizeof(unsigned),
                                cudaMemcpyDeviceToHost));
    for (size_t li = 0; li < hist->layers.size(); ++li)
      for (size_t w = 0; w < 2; ++w)
        for (size_t j = 0; j < n * bins; ++j)
          hist->layers[li].counts[(w * C + r * n) * bins + j] += host[(li * 2 + w) * n * bins + j];
  });
}

}  // namespace tmkit
