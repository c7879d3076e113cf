#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "error.h"
#include "safetensors.h"
#include "test_util.h"

using namespace tmkit;
using tmkit::test::TempDir;

namespace {

std::vector<TensorSpec> sample_specs() {
  return {{"a", DType::F32, {2, 3}}, {"b", DType::BF16, {4}}, {"c", DType::I32, {3, 1}}, {"d", DType::U8, {5}}};
}

void fill_pattern(size_t i, uint8_t* dst, const std::vector<TensorSpec>& s) {
  for (uint64_t k = 0; k < s[i].nbytes(); ++k) dst[k] = uint8_t(i * 31 + k);
}

// Writes a safetensors file from a raw header string and `data_bytes` bytes of data.
void write_raw(const fs::path& p, const std::string& header, size_t data_bytes, uint64_t declared_len = ~0ull) {
  std::string bytes(8, '\0');
  uint64_t n = declared_len == ~0ull ? header.size() : declared_len;
  for (int i = 0; i < 8; ++i) bytes[size_t(i)] = char(n >> (8 * i));
  bytes += header;
  bytes.append(data_bytes, '\x01');
  write_file(p, bytes);
}

// Expects the reader to fail with a message containing every one of `parts`.
void expect_error(const fs::path& p, std::vector<std::string> parts) {
  try {
    SafetensorsFile f(p);
    FAIL() << "no error for " << p;
  } catch (const Error& e) {
    for (const auto& part : parts) EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Safetensors, WriteReadRoundTrip) {
  TempDir tmp;
  auto specs = sample_specs();
  write_safetensors(tmp / "m.safetensors", specs, [&](size_t i, uint8_t* d) { fill_pattern(i, d, specs); }, {{"format", "pt"}});
  SafetensorsFile f(tmp / "m.safetensors");
  ASSERT_EQ(f.tensors().size(), 4u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorInfo* t = f.find(specs[i].name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype, specs[i].dtype);
    EXPECT_EQ(t->shape, specs[i].shape);
    TensorView v = f.view(*t);
    for (uint64_t k = 0; k < specs[i].nbytes(); ++k) ASSERT_EQ(v.data[k], uint8_t(i * 31 + k));
  }
  // The data area starts 8-byte aligned.
  const std::string raw = test::slurp(tmp / "m.safetensors");
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  EXPECT_EQ(n % 8, 0u);
}

TEST(Safetensors, ShardedCheckpointWithIndex) {
  TempDir tmp;
  auto specs = sample_specs();
  auto files = write_checkpoint(tmp.path(), specs, [&](size_t i, uint8_t* d) { fill_pattern(i, d, specs); }, 24);
  ASSERT_GT(files.size(), 2u);
  EXPECT_EQ(files.back(), "model.safetensors.index.json");
  Checkpoint ck(tmp.path());
  EXPECT_EQ(ck.names().size(), specs.size());
  TensorView c = ck.get("c");
  EXPECT_EQ(c.info->shape, (std::vector<int64_t>{3, 1}));
  EXPECT_EQ(c.data[0], uint8_t(2 * 31));
  EXPECT_THROW(ck.get("missing"), Error);
}

TEST(Safetensors, RealShardedModel) {
  Checkpoint ck(test::model_dir("small-llama"));
  EXPECT_TRUE(ck.has("model.embed_tokens.weight"));
  EXPECT_EQ(ck.get("model.layers.5.mlp.down_proj.weight").info->shape, (std::vector<int64_t>{512, 1536}));
}

TEST(SafetensorsBad, Truncated) {
  TempDir tmp;
  write_file(tmp / "t.safetensors", std::string("\x10\x00\x00", 3));
  expect_error(tmp / "t.safetensors", {"t.safetensors", "truncated"});
}

TEST(SafetensorsBad, HeaderLengthPastEnd) {
  TempDir tmp;
  write_raw(tmp / "h.safetensors", "{}", 0, 1000);
  expect_error(tmp / "h.safetensors", {"h.safetensors", "past the end"});
  write_raw(tmp / "h2.safetensors", "{}", 0, 1ull << 40);
  expect_error(tmp / "h2.safetensors", {"h2.safetensors", "limit"});
}

TEST(SafetensorsBad, InvalidJson) {
  TempDir tmp;
  write_raw(tmp / "j.safetensors", "{\"a\": [", 0);
  expect_error(tmp / "j.safetensors", {"j.safetensors", "JSON"});
}

TEST(SafetensorsBad, OverlappingSpans) {
  TempDir tmp;
  write_raw(tmp / "o.safetensors",
            R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12);
  expect_error(tmp / "o.safetensors", {"o.safetensors", "overlap", "'x'", "'y'"});
}

TEST(SafetensorsBad, ShapeDoesNotMatchSpan) {
  TempDir tmp;
  write_raw(tmp / "s.safetensors", R"({"w":{"dtype":"BF16","shape":[3,3],"data_offsets":[0,16]}})", 16);
  expect_error(tmp / "s.safetensors", {"s.safetensors", "'w'", "18 bytes", "16"});
}

TEST(SafetensorsBad, UnknownDtypeAndSpanOutside) {
  TempDir tmp;
  write_raw(tmp / "d.safetensors", R"({"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2);
  expect_error(tmp / "d.safetensors", {"'w'", "unsupported dtype"});
  write_raw(tmp / "e.safetensors", R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", 2);
  expect_error(tmp / "e.safetensors", {"'w'", "outside"});
  write_raw(tmp / "f.safetensors", R"({"w":{"dtype":"U8","shape":[-4],"data_offsets":[0,4]}})", 4);
  expect_error(tmp / "f.safetensors", {"'w'", "bad dimension"});
  write_raw(tmp / "g.safetensors", R"({"w":{"dtype":"U8","shape":[4611686018427387904,4],"data_offsets":[0,4]}})", 4);
  expect_error(tmp / "g.safetensors", {"'w'"});
}

TEST(SafetensorsBad, IndexEscapingTheFolder) {
  TempDir tmp;
  write_file(tmp / "model.safetensors.index.json", R"({"weight_map":{"w":"../x.safetensors"}})");
  try {
    Checkpoint ck(tmp.path());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("../x.safetensors"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("leaves the model folder"), std::string::npos) << e.what();
  }
}

TEST(SafetensorsBad, IndexNamesTensorMissingFromShard) {
  TempDir tmp;
  auto specs = sample_specs();
  write_safetensors(tmp / "s1.safetensors", specs, [&](size_t i, uint8_t* d) { fill_pattern(i, d, specs); });
  write_file(tmp / "model.safetensors.index.json", R"({"weight_map":{"a":"s1.safetensors","zz":"s1.safetensors"}})");
  EXPECT_THROW(Checkpoint{tmp.path()}, Error);
}

TEST(SafetensorsBad, DeeplyNestedHeader) {
  TempDir tmp;
  write_raw(tmp / "n.safetensors", "{\"w\":" + std::string(5000, '[') + std::string(5000, ']') + "}", 0);
  expect_error(tmp / "n.safetensors", {"n.safetensors", "nested deeper"});
}
