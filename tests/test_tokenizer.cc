// Tokenizers against the ids Hugging Face tokenizers / sentencepiece produced for the shared
// texts (shared/reference/<model>/{eval,calib}.tokens.i32), round trips, and bad text.
#include <gtest/gtest.h>

#include <chrono>
#include <nlohmann/json.hpp>

#include "error.h"
#include "hf2tm.h"
#include "test_util.h"
#include "tokenizer.h"

using namespace tmkit;
using json = nlohmann::json;

namespace {

std::string shared_text(const std::string& name) { return test::slurp(test::shared_dir() / "data" / (name + ".txt")); }

std::vector<int32_t> reference_ids(const std::string& model, const std::string& name) {
  return test::read_array<int32_t>(test::reference_dir(model) / (name + ".tokens.i32"));
}

fs::path data_file(const std::string& name) { return fs::path(TMKIT_SOURCE_DIR) / "tests" / "data" / name; }

std::string load_error(const std::string& tokenizer_json_text) {
  test::TempDir tmp;
  std::ofstream(tmp / "tokenizer.json") << tokenizer_json_text;
  try {
    load_tokenizer(tmp / "tokenizer.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

json small_llama_json() { return json::parse(test::slurp(test::model_dir("small-llama") / "tokenizer.json")); }

}  // namespace

// Each shared model's own tokenizer, on both shared texts, as one string without special tokens.
class Exactness : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(Exactness, MatchesReferenceIds) {
  const auto [model, text] = GetParam();
  const auto tok = load_tokenizer(test::model_dir(model));
  const auto ids = tok->encode(shared_text(text));
  const auto ref = reference_ids(model, text);
  ASSERT_EQ(ids.size(), ref.size());
  EXPECT_TRUE(ids == ref);
}

INSTANTIATE_TEST_SUITE_P(Models, Exactness,
                         ::testing::Combine(::testing::Values("tiny-llama", "tiny-qwen2", "small-llama"),
                                            ::testing::Values("eval", "calib")),
                         [](const auto& info) {
                           std::string n = std::get<0>(info.param) + "_" + std::get<1>(info.param);
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

// Llama-2-era tokenizer.json files (SentencePiece-style BPE with byte fallback), made from
// tiny-llama's tokenizer.model with the tokenizers library: the legacy normalizer variant
// (Prepend + Replace) and the Metaspace pre-tokenizer variant. HF encodes eval.txt with both to
// exactly tiny-llama's reference ids.
class SentencePieceStyleJson : public ::testing::TestWithParam<std::string> {};

TEST_P(SentencePieceStyleJson, MatchesReferenceAndRoundTrips) {
  const auto tok = load_tokenizer(data_file("tiny-llama-" + GetParam() + ".tokenizer.json"));
  EXPECT_EQ(tok->kind(), "bpe-metaspace");
  const std::string text = shared_text("eval");
  const auto ids = tok->encode(text);
  EXPECT_TRUE(ids == reference_ids("tiny-llama", "eval"));
  EXPECT_EQ(tok->decode(ids), text);
  EXPECT_EQ(tok->encode("Hello world", true), (std::vector<int32_t>{1, 809, 363, 323, 298, 271, 876, 879}));
}

INSTANTIATE_TEST_SUITE_P(Variants, SentencePieceStyleJson, ::testing::Values("legacy", "metaspace"));

TEST(Tokenizer, RoundTripsAllModels) {
  const std::string text = shared_text("eval");
  for (const char* model : {"tiny-llama", "tiny-qwen2", "small-llama"}) {
    const auto tok = load_tokenizer(test::model_dir(model));
    EXPECT_EQ(tok->decode(tok->encode(text)), text) << model;
    const std::string tricky = "  leading spaces, tabs\t\tand\r\nCRLF, digits 1234567, émoji 🦙, 中文, trailing  ";
    EXPECT_EQ(tok->decode(tok->encode(tricky)), tricky) << model;
  }
}

// tiny-llama's tokenizer.model encodes through tmkit's BPE engine; libsentencepiece is the judge.
TEST(Tokenizer, NativeSentencePieceMatchesLibrary) {
  const fs::path model = test::model_dir("tiny-llama") / "tokenizer.model";
  const auto native = load_sp_tokenizer(model, true), lib = load_sp_tokenizer(model, false);
  std::vector<std::string> cases = {"", " ", "  ", "a", " a", "a ", "a  b", "\n\n\n", "\t x \t", "   leading",
                                    "tabs\tand\r\nCRLF", "digits 1234567890", "émoji 🦙🦙 and 中文字符 and Ωμέγα",
                                    "\x01\x02 control", std::string("nul\0inside", 11), "ﬁ ligature ℃ ½",
                                    "trailing spaces   ", "x\xef\xbf\xbdy", "a\u00a0b\u2003c"};
  const std::string eval = shared_text("eval");
  for (size_t off = 0; off + 4000 < eval.size(); off += 97'003) cases.push_back(eval.substr(off, 4000));
  for (const auto& c : cases) EXPECT_EQ(native->encode(c), lib->encode(c)) << "'" << c << "'";
  EXPECT_EQ(native->encode("Hello world", true), lib->encode("Hello world", true));
}

TEST(Tokenizer, SpecialTokensAndTemplates) {
  EXPECT_EQ(load_tokenizer(test::model_dir("small-llama"))->encode("Hello world", true),
            (std::vector<int32_t>{0, 41, 2370, 299, 3008}));  // BOS from the TemplateProcessing post-processor
  EXPECT_EQ(load_tokenizer(test::model_dir("tiny-llama"))->encode("Hello world", true),
            (std::vector<int32_t>{1, 809, 363, 323, 298, 271, 876, 879}));  // add_bos_token
  const auto qwen = load_tokenizer(test::model_dir("tiny-qwen2"));
  EXPECT_EQ(qwen->encode("Hello world", true), qwen->encode("Hello world", false));  // template without BOS
  // Added tokens are matched in the text and kept whole.
  const auto ids = qwen->encode("a<|im_start|>b<|endoftext|>");
  ASSERT_GE(ids.size(), 4u);
  EXPECT_NE(std::find(ids.begin(), ids.end(), 1), ids.end());
  EXPECT_EQ(ids.back(), 0);
  EXPECT_EQ(qwen->decode(ids), "a<|im_start|>b<|endoftext|>");
}

TEST(Tokenizer, FromWorkspace) {
  test::TempDir tmp;
  Hf2TmOptions o;
  o.src = test::model_dir("small-llama");
  o.dst = tmp / "ws";
  convert_hf_to_tm(o);
  const auto tok = load_tokenizer(tmp / "ws");
  EXPECT_EQ(tok->encode("Hello world", true), (std::vector<int32_t>{0, 41, 2370, 299, 3008}));
  EXPECT_EQ(tok->vocab_size(), 4096);
}

TEST(BadText, InvalidUtf8IsReplaced) {
  size_t n = 0;
  EXPECT_EQ(sanitize_utf8("\xff\xfe" "abc\xe2\x82", &n), "\xef\xbf\xbd\xef\xbf\xbd" "abc\xef\xbf\xbd");
  EXPECT_EQ(n, 3u);
  EXPECT_EQ(sanitize_utf8("\xed\xa0\x80"), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");  // a surrogate: 3 replacements
  EXPECT_EQ(sanitize_utf8("\xc0\xaf"), "\xef\xbf\xbd\xef\xbf\xbd");                  // overlong
  EXPECT_EQ(sanitize_utf8("ok \xf0\x9f\xa6\x99"), "ok \xf0\x9f\xa6\x99");
  for (const char* model : {"tiny-llama", "tiny-qwen2", "small-llama"}) {
    const auto tok = load_tokenizer(test::model_dir(model));
    EXPECT_EQ(tok->encode("x\xff y"), tok->encode("x\xef\xbf\xbd y")) << model;
  }
}

TEST(BadText, NulBytesEmptyAndHugeLines) {
  for (const char* model : {"tiny-llama", "tiny-qwen2", "small-llama"}) {
    const auto tok = load_tokenizer(test::model_dir(model));
    EXPECT_TRUE(tok->encode("").empty()) << model;
    EXPECT_EQ(tok->decode({}), "") << model;
    const std::string nul("a\0b\0\0c", 6);
    const auto ids = tok->encode(nul);
    EXPECT_FALSE(ids.empty()) << model;
    if (tok->kind() == "bpe-bytelevel") {
      EXPECT_EQ(tok->decode(ids), nul) << model;
    }
    // A 10 MB line with no newline, and a 1 MB single word: bounded time, no crash.
    std::string line;
    while (line.size() < (10u << 20)) line += "the quick brown fox jumps over the lazy dog, 1234 times; ";
    const auto t0 = std::chrono::steady_clock::now();
    const auto many = tok->encode(line);
    EXPECT_GT(many.size(), line.size() / 20) << model;
    const auto word = tok->encode(std::string(1u << 20, 'a'));
    EXPECT_FALSE(word.empty()) << model;
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 60.0) << model;
  }
}

TEST(BadTokenizer, UnsupportedFieldsAreNamed) {
  json j = small_llama_json();
  j["model"]["type"] = "WordPiece";
  EXPECT_NE(load_error(j.dump()).find("model.type: unsupported tokenizer model 'WordPiece'"), std::string::npos);
  j = small_llama_json();
  j["normalizer"] = {{"type", "NFKC"}};
  EXPECT_NE(load_error(j.dump()).find("normalizer.type: unsupported normalizer 'NFKC'"), std::string::npos);
  j = small_llama_json();
  j["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Whitespace"}};
  EXPECT_NE(load_error(j.dump()).find("pre_tokenizer.pretokenizers[0].type: unsupported pre-tokenizer 'Whitespace'"),
            std::string::npos);
  j = small_llama_json();
  j["decoder"] = {{"type", "WordPiece"}};
  EXPECT_NE(load_error(j.dump()).find("decoder.type: unsupported decoder 'WordPiece'"), std::string::npos);
  j = small_llama_json();
  j["model"]["merges"][3] = {"zz-not-a-token", "q"};
  EXPECT_NE(load_error(j.dump()).find("model.merges[3]"), std::string::npos);
  j = small_llama_json();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  EXPECT_NE(load_error(j.dump()).find("(unclosed"), std::string::npos);
  EXPECT_NE(load_error("{\"model\": ").find("not valid JSON"), std::string::npos);
  EXPECT_NE(load_error("[]").find("no 'model' section"), std::string::npos);
}

TEST(BadTokenizer, DecodeRejectsUnknownIds) {
  for (const char* model : {"tiny-llama", "small-llama"}) {
    const auto tok = load_tokenizer(test::model_dir(model));
    EXPECT_THROW(tok->decode({5, int32_t(tok->vocab_size())}), Error) << model;
    EXPECT_THROW(tok->decode({-1}), Error) << model;
  }
}
