// Calibration and evaluation datasets: turning `--calib-dataset` (a text file, a folder of .txt files, a .jsonl
// file or pre-tokenized .i32 ids) into one token stream, and cutting that stream into the fixed-size blocks that
// calibration runs on (`--calib-samples`, `--calib-seqlen`, `--calib-sampling`, `--seed`).
//
// Random sampling uses its own PRNG (splitmix64 with rejection sampling) rather than <random>'s distributions,
// whose output is implementation-defined, so the same seed picks the same windows on every machine and compiler.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "file_io.h"
#include "tokenizer.h"

namespace tmkit {

struct DatasetOptions {
  std::string text_key = "text";  // --text-key: the field of each .jsonl line that holds the document
};

// Loads the documents of `path`:
//   - a folder: every regular `*.txt` file directly in it, sorted by file name, one document each;
//   - a `.jsonl` file: one document per non-blank line, the string at `opt.text_key`;
//   - any other file (except `.i32`, which holds tokens, not text): one document.
// Throws tmkit::Error naming the file (and the line number for .jsonl: bad JSON, not an object, missing key,
// non-string value), or the folder when it holds no .txt file.
std::vector<std::string> load_documents(const fs::path& path, const DatasetOptions& opt = {});

// The documents joined with "\n\n", so that two documents never run into one word.
std::string join_documents(const std::vector<std::string>& docs);

// The token stream of a dataset. `.i32` files (int32 little-endian token ids) are read directly and validated:
// the size must be a multiple of 4 and every id in [0, tok.vocab_size()). Anything else goes through
// load_documents, join_documents and tok.encode(text, false) (no BOS: the blocks are cut from the middle of the
// stream anyway).
std::vector<int32_t> dataset_tokens(const fs::path& path, const Tokenizer& tok, const DatasetOptions& opt = {});

enum class Sampling { Contiguous, Random };

struct SampleOptions {
  int64_t samples = 128, seqlen = 512;
  Sampling sampling = Sampling::Contiguous;
  uint64_t seed = 0;  // Random only
};

// "contiguous" | "random"; false (and *out untouched) for anything else.
bool parse_sampling(std::string_view s, Sampling* out);
const char* sampling_name(Sampling s);

// `opt.samples` blocks of `opt.seqlen` tokens, as one [samples * seqlen] row-major vector.
//   Contiguous: block i = tokens[i*L, (i+1)*L); needs samples * seqlen tokens.
//   Random: each block is a window whose start is uniform in [0, size - L], drawn in order from a PRNG seeded
//   with `opt.seed`; windows may overlap; needs seqlen tokens.
// Throws tmkit::Error when samples or seqlen is not positive, or when there are too few tokens, saying how many
// there are and how many are needed.
std::vector<int32_t> sample_blocks(const std::vector<int32_t>& tokens, const SampleOptions& opt);

}  // namespace tmkit
