// Calibration datasets: loading (text, folder, jsonl, i32), joining, tokenizing and block sampling.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <functional>
#include <numeric>

#include "dataset.h"
#include "error.h"
#include "test_util.h"

using namespace tmkit;

namespace {

// Each byte is its own token, so expected token streams can be written as strings; the real tokenizers are tested
// on their own and are not needed to test how a dataset becomes a stream.
class ByteTokenizer : public Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view text, bool add_special) const override {
    std::vector<int32_t> ids;
    if (add_special) ids.push_back(1);  // a fake BOS, so a wrong add_special shows in the stream
    for (unsigned char c : text) ids.push_back(int32_t(c));
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string s;
    for (int32_t id : ids) s.push_back(char(id));
    return s;
  }
  int64_t vocab_size() const override { return 256; }
  std::string kind() const override { return "bytes"; }
};

std::vector<int32_t> bytes_of(std::string_view s) { return ByteTokenizer().encode(s, false); }

std::vector<int32_t> iota_tokens(int n) {
  std::vector<int32_t> v(size_t(n), 0);
  std::iota(v.begin(), v.end(), 0);
  return v;
}


void write_i32(const fs::path& p, const std::vector<int32_t>& ids) {
  std::string bytes;
  for (int32_t id : ids) {
    uint32_t u = uint32_t(id);
    for (int b = 0; b < 4; ++b) bytes.push_back(char((u >> (8 * b)) & 0xff));
  }
  write_file(p, bytes);
}

}  // namespace

// ---- sampling ----

TEST(Sampling, ParseSampling) {
  Sampling s = Sampling::Random;
  EXPECT_TRUE(parse_sampling("contiguous", &s));
  EXPECT_EQ(s, Sampling::Contiguous);
  EXPECT_TRUE(parse_sampling("random", &s));
  EXPECT_EQ(s, Sampling::Random);
  EXPECT_FALSE(parse_sampling("Random", &s));
  EXPECT_FALSE(parse_sampling("", &s));
  EXPECT_EQ(s, Sampling::Random);  // untouched on failure
  EXPECT_STREQ(sampling_name(Sampling::Contiguous), "contiguous");
  EXPECT_STREQ(sampling_name(Sampling::Random), "random");
}

TEST(Sampling, ContiguousTakesTheFirstBlocks) {
  auto tokens = iota_tokens(100);
  SampleOptions opt;
  opt.samples = 3;
  opt.seqlen = 10;
  auto out = sample_blocks(tokens, opt);
  EXPECT_EQ(out, iota_tokens(30));

  // Exactly enough tokens is enough.
  opt.samples = 4;
  opt.seqlen = 25;
  EXPECT_EQ(sample_blocks(tokens, opt), tokens);
}

TEST(Sampling, ContiguousNotEnoughTokens) {
  SampleOptions opt;  // the defaults: 128 samples of 512
  EXPECT_EQ(test::error_of([&] { sample_blocks(iota_tokens(1000), opt); }),
            "calibration data has 1000 tokens, 128 samples of 512 need 65536");
  opt.samples = 4;
  opt.seqlen = 25;
  EXPECT_EQ(test::error_of([&] { sample_blocks(iota_tokens(99), opt); }),
            "calibration data has 99 tokens, 4 samples of 25 need 100");
}

TEST(Sampling, RandomIsReproducibleAndInRange) {
  const int size = 10000;
  auto tokens = iota_tokens(size);  // token value = position, so each block's first value is its window start
  SampleOptions opt;
  opt.samples = 16;
  opt.seqlen = 100;
  opt.sampling = Sampling::Random;
  opt.seed = 1;
  auto a = sample_blocks(tokens, opt);
  auto b = sample_blocks(tokens, opt);
  ASSERT_EQ(a.size(), size_t(16 * 100));
  EXPECT_EQ(a, b);

  // Fixed by splitmix64(seed 1) and the rejection sampler; if this changes, every random calibration run on
  // record changes too.
  EXPECT_EQ(a[0], 3381);

  std::vector<int32_t> starts;
  for (int i = 0; i < 16; ++i) {
    int32_t start = a[size_t(i) * 100];
    starts.push_back(start);
    EXPECT_GE(start, 0);
    EXPECT_LE(start, size - 100);
    for (int j = 0; j < 100; ++j) ASSERT_EQ(a[size_t(i) * 100 + j], start + j) << "window " << i;
  }
  // The windows are not all the same (a constant PRNG would pass the checks above).
  std::sort(starts.begin(), starts.end());
  EXPECT_GT(std::unique(starts.begin(), starts.end()) - starts.begin(), 8);

  opt.seed = 2;
  EXPECT_NE(sample_blocks(tokens, opt), a);
}

TEST(Sampling, RandomCoversTheWholeRange) {
  // A stream of L+1 tokens has two windows; both must be drawn (start size-L is inclusive).
  auto tokens = iota_tokens(11);
  SampleOptions opt;
  opt.samples = 64;
  opt.seqlen = 10;
  opt.sampling = Sampling::Random;
  opt.seed = 7;
  auto out = sample_blocks(tokens, opt);
  bool saw0 = false, saw1 = false;
  for (int i = 0; i < 64; ++i) {
    int32_t start = out[size_t(i) * 10];
    ASSERT_TRUE(start == 0 || start == 1) << start;
    (start == 0 ? saw0 : saw1) = true;
  }
  EXPECT_TRUE(saw0 && saw1);

  // Exactly L tokens: the one window, however many samples. Random needs only L tokens, not N*L.
  opt.samples = 5;
  opt.seqlen = 11;
  auto all = sample_blocks(tokens, opt);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(std::vector<int32_t>(all.begin() + i * 11, all.begin() + (i + 1) * 11), tokens);
}

TEST(Sampling, RandomNotEnoughTokens) {
  SampleOptions opt;
  opt.sampling = Sampling::Random;
  EXPECT_EQ(test::error_of([&] { sample_blocks(iota_tokens(511), opt); }),
            "calibration data has 511 tokens, random samples of 512 need at least 512");
  EXPECT_EQ(test::error_of([&] { sample_blocks({}, opt); }),
            "calibration data has 0 tokens, random samples of 512 need at least 512");
}

TEST(Sampling, RejectsNonPositiveSizes) {
  auto tokens = iota_tokens(100);
  SampleOptions opt;
  opt.samples = 0;
  opt.seqlen = 10;
  EXPECT_NE(test::error_of([&] { sample_blocks(tokens, opt); }).find("--calib-samples must be positive"),
            std::string::npos);
  opt.samples = 1;
  opt.seqlen = -5;
  EXPECT_NE(test::error_of([&] { sample_blocks(tokens, opt); }).find("--calib-seqlen must be positive, got -5"),
            std::string::npos);
  opt.sampling = Sampling::Random;
  opt.seqlen = 0;
  EXPECT_NE(test::error_of([&] { sample_blocks(tokens, opt); }).find("--calib-seqlen must be positive"), std::string::npos);
  // An overflowing N*L is an error, not a wrapped-around small number.
  opt.samples = int64_t(1) << 40;
  opt.seqlen = int64_t(1) << 40;
  EXPECT_NE(test::error_of([&] { sample_blocks(tokens, opt); }).find("too large"), std::string::npos);
}

// ---- loading ----

TEST(Dataset, JoinDocuments) {
  EXPECT_EQ(join_documents({}), "");
  EXPECT_EQ(join_documents({"one"}), "one");
  EXPECT_EQ(join_documents({"a", "", "b c"}), "a\n\n\n\nb c");
}

TEST(Dataset, TextFileIsOneDocument) {
  test::TempDir tmp;
  const std::string text = "first paragraph\n\nsecond paragraph\n";
  write_file(tmp / "wiki.raw", text);  // any extension but .jsonl/.i32 is text
  auto docs = load_documents(tmp / "wiki.raw");
  ASSERT_EQ(docs.size(), 1u);
  EXPECT_EQ(docs[0], text);
  ByteTokenizer tok;
  EXPECT_EQ(dataset_tokens(tmp / "wiki.raw", tok), bytes_of(text));  // and encoded without add_special
}

TEST(Dataset, FolderSortedByNameAndJoined) {
  test::TempDir tmp;
  fs::create_directories(tmp / "corpus" / "sub.txt");  // a folder named *.txt is not a document
  write_file(tmp / "corpus" / "b.txt", "bee");
  write_file(tmp / "corpus" / "a.txt", "ay");
  write_file(tmp / "corpus" / "10.txt", "ten");
  write_file(tmp / "corpus" / "notes.md", "ignored");
  write_file(tmp / "corpus" / "sub.txt" / "deep.txt", "not recursed into");
  auto docs = load_documents(tmp / "corpus");
  EXPECT_EQ(docs, (std::vector<std::string>{"ten", "ay", "bee"}));
  ByteTokenizer tok;
  EXPECT_EQ(dataset_tokens(tmp / "corpus", tok), bytes_of("ten\n\nay\n\nbee"));
}

TEST(Dataset, FolderWithoutTxtFails) {
  test::TempDir tmp;
  fs::create_directories(tmp / "empty");
  std::string e = test::error_of([&] { load_documents(tmp / "empty"); });
  EXPECT_NE(e.find((tmp / "empty").string()), std::string::npos) << e;
  EXPECT_NE(e.find("no .txt files"), std::string::npos) << e;

  write_file(tmp / "empty" / "readme.md", "x");
  e = test::error_of([&] { load_documents(tmp / "empty"); });
  EXPECT_NE(e.find("no .txt files"), std::string::npos) << e;
}

TEST(Dataset, MissingAndUnreadableFiles) {
  test::TempDir tmp;
  std::string e = test::error_of([&] { load_documents(tmp / "nope.txt"); });
  EXPECT_NE(e.find((tmp / "nope.txt").string()), std::string::npos) << e;
  ByteTokenizer tok;
  e = test::error_of([&] { dataset_tokens(tmp / "nope.i32", tok); });
  EXPECT_NE(e.find((tmp / "nope.i32").string()), std::string::npos) << e;

  // Something that cannot be read as a file (tests run as root, so permissions would not stop it).
  ASSERT_EQ(::mkfifo((tmp / "pipe.txt").c_str(), 0600), 0);
  e = test::error_of([&] { load_documents(tmp / "pipe.txt"); });
  EXPECT_NE(e.find((tmp / "pipe.txt").string()), std::string::npos) << e;
}

TEST(Dataset, JsonlWithTextKey) {
  test::TempDir tmp;
  write_file(tmp / "d.jsonl",
             "{\"content\": \"alpha\", \"id\": 1}\n"
             "\n"
             "   \r\n"
             "{\"content\": \"be\\nta\\u00e9\"}\r\n"
             "{\"id\": 3, \"content\": \"\"}");  // no newline at the end
  DatasetOptions opt;
  opt.text_key = "content";
  auto docs = load_documents(tmp / "d.jsonl", opt);
  EXPECT_EQ(docs, (std::vector<std::string>{"alpha", "be\nta\xc3\xa9", ""}));
  ByteTokenizer tok;
  EXPECT_EQ(dataset_tokens(tmp / "d.jsonl", tok, opt), bytes_of("alpha\n\nbe\nta\xc3\xa9\n\n"));

  // The default key is "text".
  write_file(tmp / "t.jsonl", "{\"text\": \"x\"}\n{\"text\": \"y\"}\n");
  EXPECT_EQ(load_documents(tmp / "t.jsonl"), (std::vector<std::string>{"x", "y"}));
}

TEST(Dataset, JsonlErrors) {
  test::TempDir tmp;
  const std::string f = (tmp / "d.jsonl").string();
  auto err = [&](const std::string& content, const std::string& key = "text") {
    write_file(f, content);
    DatasetOptions opt;
    opt.text_key = key;
    return test::error_of([&] { load_documents(f, opt); });
  };
  // Line numbers count blank lines, so they match an editor's.
  std::string e = err("{\"text\": \"a\"}\n\n{\"text\": \"b\"\n");
  EXPECT_EQ(e.rfind(f + ":3: bad JSON: ", 0), 0u) << e;

  e = err("{\"text\": \"a\"}\n{\"body\": \"b\"}\n");
  EXPECT_EQ(e, f + ":2: no key 'text' (set it with --text-key)");
  e = err("{\"text\": \"a\"}\n", "body");
  EXPECT_EQ(e, f + ":1: no key 'body' (set it with --text-key)");

  e = err("{\"text\": 5}\n");
  EXPECT_EQ(e, f + ":1: 'text' is a number, not a string");
  e = err("{\"text\": [\"a\"]}\n");
  EXPECT_EQ(e, f + ":1: 'text' is an array, not a string");
  e = err("{\"text\": \"ok\"}\n\"just a string\"\n");
  EXPECT_EQ(e, f + ":2: expected a JSON object, got a string");

  e = err("\n  \n");
  EXPECT_EQ(e, f + ": no documents (the file is empty or blank)");
}

TEST(Dataset, I32Tokens) {
  test::TempDir tmp;
  const std::vector<int32_t> ids = {0, 1, 255, 128, 7, 42};
  write_i32(tmp / "toks.i32", ids);
  ByteTokenizer tok;
  EXPECT_EQ(dataset_tokens(tmp / "toks.i32", tok), ids);
  // .i32 holds tokens: load_documents refuses it rather than treating binary as text.
  EXPECT_NE(test::error_of([&] { load_documents(tmp / "toks.i32"); }).find("token ids"), std::string::npos);
}

TEST(Dataset, I32Errors) {
  test::TempDir tmp;
  ByteTokenizer tok;
  const std::string f = (tmp / "toks.i32").string();

  write_file(f, std::string(10, '\0'));
  std::string e = test::error_of([&] { dataset_tokens(f, tok); });
  EXPECT_EQ(e, f + ": size 10 bytes is not a multiple of 4, so not int32 token ids");

  write_i32(f, {1, 2, 256, 3});
  e = test::error_of([&] { dataset_tokens(f, tok); });
  EXPECT_EQ(e, f + ": token 2 is 256, outside the tokenizer's vocabulary [0, 256)");

  write_i32(f, {-1});
  e = test::error_of([&] { dataset_tokens(f, tok); });
  EXPECT_EQ(e, f + ": token 0 is -1, outside the tokenizer's vocabulary [0, 256)");
}
