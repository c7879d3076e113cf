// release-model and tm-verify: SHA-256 against FIPS 180-4's examples, the figure, and the whole
// pipeline on tiny-qwen2 on the CPU (small calibration): two runs byte-identical but for
// report.json's generated_at, tm-verify's verdicts, a run killed after the quantize step and
// resumed, failing steps and bad inputs.
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <fmt/format.h>
#include <regex>

#include "manifest.h"
#include "sha256.h"
#include "svg_plot.h"
#include "test_util.h"

namespace tmkit {
namespace {

using test::files_of;
using test::q;

TEST(Sha256, MatchesTheStandardsExamples) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // A million 'a's, fed in uneven pieces (the buffering across block edges).
  Sha256 h;
  const std::string a(1000, 'a');
  for (size_t done = 0, step = 1; done < 1000000; step = step % 997 + 1) {
    const size_t n = std::min(step, 1000000 - done);
    h.update(a.data(), n);
    done += n;
  }
  EXPECT_EQ(h.hex(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  test::TempDir tmp;
  write_file(tmp / "f", std::string("abc"));
  EXPECT_EQ(sha256_file(tmp / "f"), sha256_hex("abc"));
  write_file(tmp / "empty", std::string());
  EXPECT_EQ(sha256_file(tmp / "empty"), sha256_hex(""));
}

TEST(ReleasePlot, DrawsEveryPointAndBarAndEscapesLabels) {
  const std::vector<QualityPoint> q = {{"base <bf16>", 16, 14.19, 0.05}, {"int4 & co", 4.3, 14.87, 0.06}};
  const std::vector<SpeedBar> s = {{"tp1", 300, 2}, {"tp2", 450, 3}};
  const std::string svg = release_plot_svg(q, s, "Decode speed", "");
  EXPECT_EQ(svg, release_plot_svg(q, s, "Decode speed", ""));  // deterministic
  EXPECT_NE(svg.find("base &lt;bf16&gt; (14.190)"), std::string::npos);
  EXPECT_NE(svg.find("int4 &amp; co (14.870)"), std::string::npos);
  EXPECT_EQ(std::count(svg.begin(), svg.end(), '<') - std::count(svg.begin(), svg.end(), '>'), 0);
  auto count = [&](const std::string& what) {
    size_t n = 0;
    for (size_t p = svg.find(what); p != std::string::npos; p = svg.find(what, p + 1)) ++n;
    return n;
  };
  EXPECT_EQ(count("<circle"), 2u);
  EXPECT_EQ(count("<rect") - 3, 2u);  // background and two frames, then the bars
  const std::string empty = release_plot_svg(q, {}, "Decode speed", "not measured: no GPU");
  EXPECT_NE(empty.find("not measured: no GPU"), std::string::npos);
}

// The pipeline's command line on tiny-qwen2 (int4 AWQ + KV calibration, tp 1; CPU).
std::string release_args(const fs::path& out, const std::string& extra = "",
                         const fs::path& eval = test::reference_dir("tiny-qwen2") / "eval.tokens.i32") {
  const fs::path ref = test::reference_dir("tiny-qwen2");
  return test::tool("release-model") + " " + q(test::model_dir("tiny-qwen2")) + " --out " + q(out) +
         " --kv-calibrate --calib-dataset " + q(ref / "calib.tokens.i32") + " --calib-samples 4 --calib-seqlen 256" +
         " --eval-dataset " + q(eval) + " --eval-ctx 256 --eval-chunks 8 --device cpu --no-timings" + extra;
}

std::map<std::string, std::string> without_timestamp(std::map<std::string, std::string> files) {
  std::string& report = files.at("report.json");
  report = std::regex_replace(report, std::regex("\"generated_at\": \"[^\"]*\""), "\"generated_at\": \"\"");
  return files;
}

class Release : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir;
    const auto r = test::run(release_args(*dir_ / "a", " -q"));
    ASSERT_EQ(r.code, 0) << r.err;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static fs::path first() { return *dir_ / "a"; }
  static test::TempDir* dir_;
};
test::TempDir* Release::dir_ = nullptr;

TEST_F(Release, LeavesACompleteRepositoryWithNumbersFromTheTools) {
  const fs::path a = first();
  for (const char* p : {"README.md", "report.json", "manifest.json", "plots.svg", "hf-awq/config.json",
                        "turbomind-tp1/triton_models/weights/config.yaml", "turbomind-tp1/triton_models/weights/kv_stats.safetensors"})
    EXPECT_TRUE(fs::exists(a / p)) << p;
  EXPECT_FALSE(fs::exists(a / ".scratch"));
  EXPECT_FALSE(fs::exists(a.string() + ".partial"));
  const auto report = nlohmann::json::parse(test::slurp(a / "report.json"));
  ASSERT_EQ(report["quality"].size(), 6u);  // base, int4 with fp16 KV, int8 / int4 KV x dynamic / static
  EXPECT_EQ(report["quality"][0]["artifact"], "base");
  // The int4 model's fp16-KV perplexity is tm-eval's, run independently here.
  const auto ppl = test::run(test::tool("tm-eval") + " ppl -q --json --device cpu -m " + q(a / "turbomind-tp1") +
                             " --tokens " + q(test::reference_dir("tiny-qwen2") / "eval.tokens.i32") + " -c 256 --chunks 8");
  ASSERT_EQ(ppl.code, 0) << ppl.err;
  EXPECT_EQ(report["quality"][1]["ppl"], nlohmann::json::parse(ppl.out)["ppl"]);
  EXPECT_GT(report["quality"][1]["ppl"].get<double>(), report["quality"][0]["ppl"].get<double>());
  EXPECT_EQ(report["speed"].size(), 0u);
  EXPECT_FALSE(report.contains("steps"));  // --no-timings
  const std::string card = test::slurp(a / "README.md");
  EXPECT_NE(card.find(fmt::format("{:.4f}", report["quality"][1]["ppl"].get<double>())), std::string::npos);
  EXPECT_NE(card.find("plots.svg"), std::string::npos);
  EXPECT_NE(card.find("lmdeploy serve api_server ./turbomind-tp1 --tp 1"), std::string::npos);
  // The manifest lists every file but itself, with the commands in order.
  const auto m = nlohmann::json::parse(test::slurp(a / "manifest.json"));
  EXPECT_EQ(m["files"].size() + 1, files_of(a).size());
  EXPECT_EQ(m["commands"][0]["step"], "quantize");
  EXPECT_EQ(m["commands"][0]["command"].get<std::string>().rfind("awq-quantize ", 0), 0u);
}

TEST_F(Release, TwoRunsAreByteIdenticalButForTheTimestamp) {
  const fs::path b = *dir_ / "b";
  const auto r = test::run(release_args(b, " -q"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(without_timestamp(files_of(first())), without_timestamp(files_of(b)));
  EXPECT_EQ(test::slurp(first() / "manifest.json"), test::slurp(b / "manifest.json"));
}

TEST_F(Release, VerifyPassesThenNamesEachTamperedFile) {
  const fs::path c = *dir_ / "c";
  fs::copy(first(), c, fs::copy_options::recursive);
  auto verify = [&] { return test::run(test::tool("tm-verify") + " " + q(c)); };
  auto r = verify();
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("OK"), std::string::npos);
  const fs::path weight = c / "turbomind-tp1/triton_models/weights/layers.0.attention.w_qkv.0.qweight";
  std::string bytes = test::slurp(weight);
  bytes[bytes.size() / 2] ^= 0x10;
  write_file(weight, bytes);
  r = verify();
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("layers.0.attention.w_qkv.0.qweight: sha256 differs from the manifest"), std::string::npos) << r.err;
  bytes[bytes.size() / 2] ^= 0x10;
  write_file(weight, bytes);
  EXPECT_EQ(verify().code, 0);
  write_file(c / "hf-awq/extra.bin", std::string("x"));
  r = verify();
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("hf-awq/extra.bin: not in the manifest"), std::string::npos) << r.err;
  fs::remove(c / "hf-awq/extra.bin");
  fs::remove(c / "README.md");
  r = verify();
  EXPECT_NE(r.err.find("README.md: missing"), std::string::npos) << r.err;
  fs::remove(c / "manifest.json");
  r = verify();
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("manifest.json: missing"), std::string::npos) << r.err;
}

// Killed (SIGKILL) once the quantize step is recorded, then resumed: the quantize step is not run
// again, and the repository equals an uninterrupted run's.
TEST_F(Release, ResumesAKilledRunFromItsFirstUnfinishedStep) {
  const fs::path k = *dir_ / "k";
  const std::string state = k.string() + ".partial/.release-state.json";
  const auto killed = test::run(release_args(k, " -q") + " & pid=$!; for i in $(seq 6000); do grep -q '\"quantize\": {' " +
                                q(state) + " 2>/dev/null && break; sleep 0.01; done; kill -9 $pid; wait $pid; echo $?");
  EXPECT_EQ(killed.out, "137\n") << killed.err;
  ASSERT_TRUE(fs::exists(state));
  EXPECT_FALSE(fs::exists(k));
  auto again = test::run(release_args(k));  // without --resume: refused
  EXPECT_EQ(again.code, 1);
  EXPECT_NE(again.err.find("holds an interrupted run: --resume continues it"), std::string::npos) << again.err;
  const auto r = test::run(release_args(k, " --resume"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("quantize: done before, verified"), std::string::npos) << r.err;
  EXPECT_EQ(without_timestamp(files_of(first())), without_timestamp(files_of(k)));
  EXPECT_EQ(test::run(test::tool("tm-verify") + " -q " + q(k)).code, 0);
  const auto done = test::run(release_args(k, " --resume"));  // a finished repository is checked, not rebuilt
  EXPECT_EQ(done.code, 0);
  EXPECT_NE(done.err.find("complete and verifies"), std::string::npos) << done.err;
}

TEST_F(Release, AFailedStepIsNamedAndLeavesNoRepository) {
  // tp 2 would cut tiny-qwen2's 128-channel int4 groups in half: tm-shard refuses.
  const fs::path f = *dir_ / "f";
  const auto r = test::run(release_args(f, " --tp 1,2"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("step shard-tp2 failed (exit 1): tm-shard: error:"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(f));
  EXPECT_FALSE(fs::exists(f.string() + ".partial/turbomind-tp2"));
  EXPECT_TRUE(fs::exists(f.string() + ".partial/turbomind-tp1"));
  // Resuming with other options is refused.
  const auto other = test::run(release_args(f, " --tp 1 --resume"));
  EXPECT_EQ(other.code, 1);
  EXPECT_NE(other.err.find("was started with other options"), std::string::npos) << other.err;
  // And resuming over other data under the same path (the eval text changed since).
  const fs::path eval = *dir_ / "eval.i32";
  std::string ids = test::slurp(test::reference_dir("tiny-qwen2") / "eval.tokens.i32");
  write_file(eval, ids);
  const fs::path g = *dir_ / "g";
  EXPECT_EQ(test::run(release_args(g, " --tp 1,2", eval)).code, 1);
  std::swap(ids[0], ids[4]);
  write_file(eval, ids);
  const auto changed = test::run(release_args(g, " --tp 1,2 --resume", eval));
  EXPECT_EQ(changed.code, 1);
  EXPECT_NE(changed.err.find("was started with other options or data"), std::string::npos) << changed.err;
  // So is a second run while another holds the partial repository (its lock, taken here).
  const int fd = ::open((f.string() + ".partial").c_str(), O_RDONLY | O_DIRECTORY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  const auto locked = test::run(release_args(f, " --tp 1,2 --resume"));
  ::close(fd);
  EXPECT_EQ(locked.code, 1);
  EXPECT_NE(locked.err.find("another release-model is writing it"), std::string::npos) << locked.err;
}

TEST(ReleaseModel, BadInputsFailNamingTheProblem) {
  test::TempDir tmp;
  const fs::path ref = test::reference_dir("tiny-qwen2");
  const std::string base = test::tool("release-model") + " --eval-dataset " + q(ref / "eval.tokens.i32") + " --device cpu -q ";
  auto err = [&](const std::string& args) {
    const auto r = test::run(base + args);
    EXPECT_EQ(r.code, 1) << args;
    return r.err;
  };
  EXPECT_NE(err(q(tmp / "nope") + " --out " + q(tmp / "o")).find("nope: not a Hugging Face model folder"), std::string::npos);
  const std::string model = q(test::model_dir("tiny-qwen2"));
  EXPECT_NE(err(model + " --out " + q(tmp / "o")).find("--calib-dataset is required"), std::string::npos);
  EXPECT_NE(err(model + " --no-quant --tp 1,x --out " + q(tmp / "o")).find("--tp: 'x' is not a size"), std::string::npos);
  EXPECT_NE(err(model + " --no-quant --tp 2,2 --out " + q(tmp / "o")).find("--tp: 2 given twice"), std::string::npos);
  fs::create_directories(tmp / "exists");
  EXPECT_NE(err(model + " --no-quant --out " + q(tmp / "exists")).find("exists (--force replaces it"), std::string::npos);
  EXPECT_NE(err(model + " --no-quant --calib-dataset " + q(tmp / "missing.txt") + " --out " + q(tmp / "o")).find("missing.txt: no such"),
            std::string::npos);
  // --force never deletes an input: neither the model nor a dataset may lie inside --out.
  EXPECT_NE(err(model + " --no-quant --force --out " + q(test::model_dir("tiny-qwen2").parent_path())).find("source model folder"),
            std::string::npos);
  write_file(tmp / "exists" / "eval.i32", test::slurp(ref / "eval.tokens.i32"));
  EXPECT_NE(test::run(test::tool("release-model") + " " + model + " --no-quant --force --device cpu --eval-dataset " +
                      q(tmp / "exists" / "eval.i32") + " --out " + q(tmp / "exists"))
                .err.find("holds the dataset"),
            std::string::npos);
  EXPECT_TRUE(fs::exists(tmp / "exists" / "eval.i32"));
  EXPECT_FALSE(fs::exists(tmp / "o"));
}

// Without quantization: 16-bit workspaces at tp 1 and 2 (tm-shard), both evaluated; the CPU oracle
// runs the merged ranks, so their perplexities agree.
TEST(ReleaseModel, NoQuantWithTwoTensorParallelSizes) {
  test::TempDir tmp;
  const fs::path ref = test::reference_dir("tiny-qwen2");
  const auto r = test::run(test::tool("release-model") + " " + q(test::model_dir("tiny-qwen2")) + " --out " + q(tmp / "r") +
                           " --no-quant --tp 1,2 --eval-dataset " + q(ref / "eval.tokens.i32") +
                           " --eval-ctx 128 --eval-chunks 4 --device cpu --no-timings -q");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto report = nlohmann::json::parse(test::slurp(tmp / "r" / "report.json"));
  ASSERT_GE(report["quality"].size(), 2u);
  EXPECT_EQ(report["quality"][0]["artifact"], "turbomind-tp1");
  EXPECT_EQ(report["quality"][1]["artifact"], "turbomind-tp2");
  EXPECT_NEAR(report["quality"][0]["ppl"].get<double>(), report["quality"][1]["ppl"].get<double>(), 1e-9);
  EXPECT_TRUE(report["quantization"].is_null());
  EXPECT_FALSE(fs::exists(tmp / "r" / "hf-awq"));
  EXPECT_EQ(test::run(test::tool("tm-verify") + " -q " + q(tmp / "r")).code, 0);
}

}  // namespace
}  // namespace tmkit
