// One tensor-parallel rank's share of merged workspace weights, for the GPU runtime's TP (one
// device per rank, NCCL all-reduce after wo and w2). The split is TurboMind's (lmdeploy v0.6.4,
// ../shared/specs/turbomind-format.md §4-§6), heads contiguous per rank:
//   wq / bq        columns of query heads [r H/tp, (r+1) H/tp)
//   wk, wv / bk,bv columns of kv heads [r KV/tp, (r+1) KV/tp)  (GQA groups stay on their rank)
//   wo             rows of the rank's query heads
//   w1, w3 / w2    columns / rows [r I/tp, (r+1) I/tp) of the padded intermediate size
//   int4           qkv4 = [q_r | k_r | v_r] and w13_4 = [w1_r | w3_r] columns, wo4 / w2_4 rows in
//                  whole groups: exactly the rank files of `hf2tm --tp N`
// Replicated on every rank: norms, the wo bias (added after the all-reduce, as TurboMind adds it;
// each rank keeps the full residual stream), and the embedding, LM head and final norm (TurboMind
// splits those two and gathers; here every rank holds them and only rank 0 runs the head).
// Any tp works from merged weights (load_workspace merges a workspace's ranks), so the runtime's
// tp need not be the workspace's.
#pragma once
#include "model_weights.h"

namespace tmkit {

// Fails with one line naming what does not split: tp < 1, the heads, the kv heads, a layer's
// inter_size, or (int4) a rank's rows of wo / w2 that are not whole quantization groups.
void check_tp_split(const TmConfig& cfg, int tp);

// Rank `rank` of `tp`: cfg.head_num, kv_head_num and every inter_size divided by tp, cfg.tp = 1.
ModelWeights rank_slice(const ModelWeights& w, int rank, int tp);

}  // namespace tmkit
