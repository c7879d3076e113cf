#include "bpe_model.h"

#include <queue>

namespace tmkit {

void BpeMerges::add(int32_t left, int32_t right, int32_t rank, int32_t merged) {
  pairs_.emplace(key(left, right), Merge{rank, merged});  // the first (best-ranked) merge of a pair wins
}

void BpeMerges::apply(std::vector<int32_t>& ids) const {
  const int n = int(ids.size());
  if (n < 2) return;
  if (n == 2) {  // the common short case without the heap
    if (const Merge* m = find(ids[0], ids[1])) ids = {m->merged};
    return;
  }
  std::vector<int> prev(static_cast<size_t>(n)), next(static_cast<size_t>(n));
  std::vector<char> alive(size_t(n), 1);
  for (int i = 0; i < n; ++i) {
    prev[size_t(i)] = i - 1;
    next[size_t(i)] = i + 1 < n ? i + 1 : -1;
  }
  struct Cand { int32_t rank; int pos; int32_t merged; };
  auto worse = [](const Cand& a, const Cand& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
  std::priority_queue<Cand, std::vector<Cand>, decltype(worse)> heap(worse);
  for (int i = 0; i + 1 < n; ++i)
    if (const Merge* m = find(ids[size_t(i)], ids[size_t(i) + 1])) heap.push({m->rank, i, m->merged});

  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    const int j = next[size_t(c.pos)];
    if (!alive[size_t(c.pos)] || j < 0) continue;
    const Merge* m = find(ids[size_t(c.pos)], ids[size_t(j)]);
    if (!m || m->merged != c.merged) continue;  // stale: a neighbour changed since this was queued
    ids[size_t(c.pos)] = c.merged;
    alive[size_t(j)] = 0;
    next[size_t(c.pos)] = next[size_t(j)];
    if (next[size_t(j)] >= 0) prev[size_t(next[size_t(j)])] = c.pos;
    if (const int p = prev[size_t(c.pos)]; p >= 0)
      if (const Merge* pm = find(ids[size_t(p)], ids[size_t(c.pos)])) heap.push({pm->rank, p, pm->merged});
    if (const int q = next[size_t(c.pos)]; q >= 0)
      if (const Merge* nm = find(ids[size_t(c.pos)], ids[size_t(q)])) heap.push({nm->rank, c.pos, nm->merged});
  }
  size_t w = 0;
  for (int i = 0; i >= 0; i = next[size_t(i)]) ids[w++] = ids[size_t(i)];
  ids.resize(w);
}

}  // namespace tmkit
