// The AWQ search on the GPU against the CPU search (ctest label `gpu`; skips without a device):
// its quantizer bit for bit, its choices, its quality and its determinism.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <nlohmann/json.hpp>

#include "awq_search.h"
#include "cuda/awq_kernels.h"
#include "dataset.h"
#include "gpu_model.h"
#include "hf2tm.h"
#include "hf_awq.h"
#include "model_weights.h"
#include "perplexity.h"
#include "rtn.h"
#include "safetensors.h"
#include "splitmix64.h"
#include "test_util.h"

using namespace tmkit;

namespace {

class AwqGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!GpuModel::available()) GTEST_SKIP() << "no CUDA device";
  }
};

double gpu_ppl(const fs::path& hf, const fs::path& ws, const std::string& model) {
  Hf2TmOptions o;
  o.src = hf;
  o.dst = ws;
  convert_hf_to_tm(o);
  GpuModel gpu(load_workspace(ws));
  const auto ids = read_tokens(test::reference_dir(model) / "eval.tokens.i32", gpu.config().vocab_size);
  const auto ref = nlohmann::json::parse(test::slurp(test::reference_dir(model) / "reference.json"));
  return perplexity([&](const int32_t* t, int64_t T, double* s, double* s2) { gpu.nll_sums(t, T, s, s2); }, ids,
                    ref["eval_ctx"].get<int64_t>(), 0, 1)
      .ppl;
}

}  // namespace

// The candidate weights of the scale search: the kernel's fp16(Q(W s) / s) equals the host
// quantizer of rtn.h (fp16 steps) bit for bit, for wide and tiny ranges, constant groups and zeros.
TEST_F(AwqGpu, FakeQuantEqualsTheHostQuantizer) {
  const int rows = 48, K = 512, group = 128;
  SplitMix64 rng{7};
  std::vector<float> W(size_t(rows) * K), s(K);
  for (size_t i = 0; i < W.size(); ++i) W[i] = float(rng.symmetric()) * (i % 3 ? 0.05f : 1.5f);
  for (int k = 0; k < group; ++k) W[size_t(k)] = 0.25f;         // row 0, group 0: constant
  for (int k = 0; k < group; ++k) W[size_t(K + k)] = 0.0f;      // row 1, group 0: zeros
  for (int k = 0; k < K; ++k) s[size_t(k)] = float(1.7 + 1.5 * rng.symmetric());
  float *dW, *ds;
  __half* dout;
  ASSERT_EQ(cudaMalloc(&dW, W.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&ds, s.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dout, W.size() * 2), cudaSuccess);
  cudaMemcpy(dW, W.data(), W.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(ds, s.data(), s.size() * 4, cudaMemcpyHostToDevice);
  for (const bool scaled : {false, true}) {
    cuda::awq_fake_quant(dW, rows, K, scaled ? ds : nullptr, group, dout, nullptr);
    std::vector<uint16_t> got(W.size());
    cudaMemcpy(got.data(), dout, got.size() * 2, cudaMemcpyDeviceToHost);
    int64_t mismatches = 0;
    for (int r = 0; r < rows; ++r)
      for (int g0 = 0; g0 < K; g0 += group) {
        float lo = INFINITY, hi = -INFINITY;
        auto value = [&](int k) { return fp16_round(scaled ? W[size_t(r) * K + k] * s[size_t(k)] : W[size_t(r) * K + k]); };
        for (int k = g0; k < g0 + group; ++k) {
          lo = std::fmin(lo, value(k));
          hi = std::fmax(hi, value(k));
        }
        const QuantGroup p = quant_group(lo, hi);
        for (int k = g0; k < g0 + group; ++k) {
          const float dq = dequant(quant_code(value(k), p), p);
          mismatches += got[size_t(r) * K + k] != float_to_half(scaled ? dq / s[size_t(k)] : dq);
        }
      }
    EXPECT_EQ(mismatches, 0) << (scaled ? "scaled" : "plain");
  }
  cudaFree(dW);
  cudaFree(ds);
  cudaFree(dout);
}

// The final quantization and AWQ packing on the device equal the hf-awq writer's on the host
// (quantize_rtn, awq_pack), also when the rows of q/k heads come in RoPE pair order.
TEST_F(AwqGpu, FinalQuantizationEqualsTheHostWriter) {
  const int N = 2 * 64, K = 384, group = 128, D = 64;
  SplitMix64 rng{11};
  std::vector<float> W(size_t(N) * K), pairs(W.size()), wt(W.size());
  for (float& v : W) v = float(rng.symmetric()) * 0.08f;
  for (int k = 0; k < group; ++k) W[size_t(3) * K + k] = -0.5f;  // a constant group
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) wt[size_t(k) * N + n] = W[size_t(n) * K + k];
  for (int t = 0; t < N; ++t) {  // row t of a head in pair order holds HF row (t % 2) D/2 + t/2
    const int hf = t / D * D + (t % D % 2) * (D / 2) + t % D / 2;
    std::copy_n(W.begin() + ptrdiff_t(hf) * K, K, pairs.begin() + ptrdiff_t(t) * K);
  }
  const Int4Linear q = quantize_rtn(wt.data(), K, N, group);
  const std::vector<int32_t> want_w = awq_pack(int4_codes(q), K, N), want_z = awq_pack(int4_zero_codes(q), K / group, N);
  float* dW;
  uint8_t *codes, *zcodes;
  int32_t *qw, *qz;
  __half* sc;
  ASSERT_EQ(cudaMalloc(&dW, W.size() * 4), cudaSuccess);
  cudaMalloc(&codes, W.size());
  cudaMalloc(&zcodes, size_t(K / group) * N);
  cudaMalloc(&qw, W.size() / 2);
  cudaMalloc(&qz, size_t(K / group) * N / 2);
  cudaMalloc(&sc, size_t(K / group) * N * 2);
  for (const bool in_pairs : {false, true}) {
    cudaMemcpy(dW, (in_pairs ? pairs : W).data(), W.size() * 4, cudaMemcpyHostToDevice);
    cuda::awq_quantize_pack(dW, N, K, group, in_pairs ? D : 0, codes, zcodes, qw, qz, sc, nullptr);
    std::vector<int32_t> got_w(want_w.size()), got_z(want_z.size());
    std::vector<uint16_t> got_s(q.scales.size());
    cudaMemcpy(got_w.data(), qw, got_w.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(got_z.data(), qz, got_z.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(got_s.data(), sc, got_s.size() * 2, cudaMemcpyDeviceToHost);
    EXPECT_EQ(got_w, want_w) << (in_pairs ? "pair order" : "HF order");
    EXPECT_EQ(got_z, want_z) << (in_pairs ? "pair order" : "HF order");
    EXPECT_EQ(got_s, q.scales) << (in_pairs ? "pair order" : "HF order");
  }
  for (void* p : std::initializer_list<void*>{dW, codes, zcodes, qw, qz, sc}) cudaFree(p);
}

// The GPU search on 16 x 256 calibration tokens chooses as the CPU search does (the same rules,
// fp16 GEMM inputs instead of fp32: near-ties may go the other way), beats RTN, and reruns give
// identical weights.
TEST_F(AwqGpu, ChoosesAsTheCpuSearchBeatsRtnAndRerunsIdentically) {
  for (const std::string model : {"tiny-qwen2", "tiny-llama"}) {
    test::TempDir tmp;
    const fs::path src = test::model_dir(model);
    const auto calib = read_tokens(test::reference_dir(model) / "calib.tokens.i32", load_hf_config(src).vocab);
    const auto blocks = sample_blocks(calib, {16, 256, Sampling::Contiguous, 0});
    const AwqResult gpu = awq_search_cuda(src, blocks, 16, 256, {});
    const AwqResult cpu = awq_search_cpu(src, blocks, 16, 256, {});
    ASSERT_EQ(gpu.layers.size(), cpu.layers.size());
    int same = 0, groups = 0;
    for (size_t l = 0; l < gpu.layers.size(); ++l) {
      const auto &g = gpu.layers[l], &c = cpu.layers[l];
      for (size_t i = 0; i < 4; ++i) {
        if (c.ratio[i] < 0) continue;
        ++groups;
        same += g.ratio[i] == c.ratio[i];
        EXPECT_NEAR(g.loss_ratio0[i] / c.loss_ratio0[i], 1.0, 0.05) << model << " layer " << l << " group " << i;
        std::printf("%s layer %zu group %zu: ratio GPU %.2f CPU %.2f, loss at 0 GPU %.4g CPU %.4g\n", model.c_str(), l,
                    i, g.ratio[i], c.ratio[i], g.loss_ratio0[i], c.loss_ratio0[i]);
      }
      EXPECT_NEAR(g.clip_mean_ratio, c.clip_mean_ratio, 0.01) << model << " layer " << l;
    }
    std::printf("%s: %d of %d scale choices equal to the CPU search's\n", model.c_str(), same, groups);
    EXPECT_GE(same, groups * 3 / 4) << model;

    fs::create_directories(tmp / "awq");
    fs::create_directories(tmp / "rtn");
    write_hf_awq(src, tmp / "awq" / model, 128, false, &gpu.tensors, &gpu.packed);
    write_hf_awq_rtn(src, tmp / "rtn" / model, 128, false);
    const double awq = gpu_ppl(tmp / "awq" / model, tmp / "awq-ws", model);
    const double rtn = gpu_ppl(tmp / "rtn" / model, tmp / "rtn-ws", model);
    std::printf("%s: AWQ (16 x 256, GPU search) ppl %.4f, RTN %.4f\n", model.c_str(), awq, rtn);
    EXPECT_LT(awq, rtn) << model;

    const AwqResult again = awq_search_cuda(src, blocks, 16, 256, {});
    EXPECT_TRUE(again.tensors == gpu.tensors && again.packed == gpu.packed) << model << ": reruns differ";
    EXPECT_EQ(gpu.packed.size(), size_t(7 * load_hf_config(src).layers));
  }
}

// --skip-indivisible on the GPU: the intermediate size 200 does not split into groups of 128, so
// down_proj comes back unquantized and untouched (fp32 values of the checkpoint), every other linear packed.
TEST_F(AwqGpu, SkipIndivisibleKeepsThoseLinearsUnquantized) {
  test::TempDir tmp;
  const fs::path src = tmp / "synth";
  const std::vector<int32_t> ids = test::indivisible_model(src);
  AwqOptions opt;
  opt.skip_indivisible = true;
  const AwqResult r = awq_search_cuda(src, ids, 4, 64, opt);
  const Checkpoint ck(src);
  for (int layer = 0; layer < 2; ++layer) {
    const std::string down = fmt::format("model.layers.{}.mlp.down_proj.weight", layer);
    EXPECT_FALSE(r.packed.count(down));
    EXPECT_TRUE(r.packed.count(fmt::format("model.layers.{}.mlp.up_proj.weight", layer)));
    ASSERT_TRUE(r.tensors.count(down));
    const TensorView v = ck.get(down);
    for (int64_t i = 0; i < v.info->numel(); ++i)
      ASSERT_EQ(r.tensors.at(down)[size_t(i)], load_float(v.data, v.dtype(), size_t(i))) << down << " changed at " << i;
    EXPECT_EQ(r.layers[size_t(layer)].ratio[3], -1.0);
  }
  EXPECT_EQ(r.packed.size(), 12u);
}

// Activations that overflow the fp16 the search runs in fail naming the layer (the weights are
// finite: an input norm of 1e6 makes the normed activations infinite in fp16).
TEST_F(AwqGpu, NonFiniteActivationsNameTheLayer) {
  test::TempDir tmp;
  const fs::path src = test::model_dir("tiny-qwen2");
  fs::copy(src, tmp / "big", fs::copy_options::recursive);
  fs::permissions(tmp / "big" / "model.safetensors", fs::perms::owner_write, fs::perm_options::add);
  {
    const SafetensorsFile f(tmp / "big" / "model.safetensors");
    const TensorInfo* t = f.find("model.layers.0.post_attention_layernorm.weight");
    ASSERT_NE(t, nullptr);
    ASSERT_EQ(t->dtype, DType::BF16);
    std::string bytes = test::slurp(tmp / "big" / "model.safetensors");
    uint64_t header = 0;
    std::memcpy(&header, bytes.data(), 8);
    const uint16_t big = float_to_bf16(1e6f);
    for (int64_t i = 0; i < t->numel(); ++i) std::memcpy(bytes.data() + 8 + header + t->begin + 2 * i, &big, 2);
    fs::remove(tmp / "big" / "model.safetensors");
    write_file(tmp / "big" / "model.safetensors", bytes);
  }
  const auto calib = read_tokens(test::reference_dir("tiny-qwen2") / "calib.tokens.i32", load_hf_config(src).vocab);
  const auto blocks = sample_blocks(calib, {2, 64, Sampling::Contiguous, 0});
  const std::string err = test::error_of([&] { awq_search_cuda(tmp / "big", blocks, 2, 64, {}); });
  EXPECT_NE(err.find("layer 0: the layer output (calibration activations) holds NaN or Inf"), std::string::npos) << err;
}
