// Causal GQA attention of B sequences on tensor cores, flash-attention style (online softmax; the
// [T, T] score matrix never exists in memory). Queries are rows pos0 .. pos0 + T - 1 of each
// sequence; keys and values are rows 0 .. pos0 + T - 1, read through a reader (kv_cache.cuh): the
// fp32 qkv buffer itself for a plain forward (pos0 = 0), or the KV cache in fp16/int8/int4 for
// prefill-with-cache. Few queries over a long cache (decode) go to attention_decode.cu instead,
// which splits the keys.
//
// Grid (ceil(T / 64), H, B), the query tiles with the most keys (causal) launched first: one block
// per tile of BQ = 64 query rows of one head, 4 warps of 16 rows each. Per key tile of BK = 64:
//   - every thread loads keys and values through the reader, converts them to T (fp16, or bf16 for
//     a bf16 model) and stores them row-major in shared memory, rows D + 8 values apart (16 bytes
//     of padding put the 8 rows an ldmatrix phase reads in 8 distinct bank groups). From an fp16
//     cache into fp16 tiles nothing needs converting: cp.async copies the next tile into a second
//     buffer while the warps compute on this one (the register path waits for every tile);
//   - each warp computes its 16 x 64 scores S = Q K^T with mma.sync m16n8k16 (Q: A fragments in
//     registers for the whole block, pre-multiplied by scale * log2(e); K: B fragments by ldmatrix),
//     masks keys past its rows (causal) or past the end, folds S into the running row max and sum
//     (base-2 exponentials), rescales its output, and adds P V, where P is S's accumulator
//     registers rounded to T: the C layout of S is the A layout P needs (mma.cuh), and V's B
//     fragments come from ldmatrix.trans of the row-major tile.
// A warp skips key tiles entirely after its last row. Rows past T compute on zero queries and are
// not stored. Output [B T, H D] in T: row b T + t, head h at h D, row-major or (staged_m8 > 0)
// staged for the int4 wo (staged_x.cuh: each lane's pairs stay 4-byte stores). Queries: row
// b T + t of q, stride q_stride. Rounding: Q, K, V and P to T, sums in fp32 (as flash attention
// in fp16).
#include <tuple>
#include <type_traits>

#include "kernels.h"
#include "kv_cache.cuh"
#include "mma.cuh"
#include "staged_x.cuh"

namespace tmkit::cuda {

namespace {

constexpr int kWarps = 4, kBQ = 16 * kWarps, kBK = 64;

// Tiles by cp.async, double-buffered: the cache holds exactly the values the tiles hold.
template <typename T, typename Kv>
constexpr bool kAsyncTiles = std::is_same_v<T, __half> && std::is_same_v<Kv, CacheReader<16>>;

template <typename T, int D, typename Kv>
constexpr int kSmemBytes = (kAsyncTiles<T, Kv> ? 2 : 1) * 2 * kBK * (D + 8) * int(sizeof(T));

template <typename T, int D, typename Kv>
__global__ void __launch_bounds__(kWarps * 32) attention_prefill_kernel(const float* q, size_t q_stride, Kv kv, int T_,
                                                                       int pos0, const int* pos_dev, int H, int KV,
                                                                       float scale, int staged_m8, T* out) {
  pdl_begin();
  if (pos_dev) pos0 = *pos_dev;  // decode steps replayed from a CUDA graph read the position here
  constexpr bool kAsync = kAsyncTiles<T, Kv>;
  constexpr int kStride = D + 8;                  // values per shared-memory row
  constexpr int kStage = 2 * kBK * kStride;       // a K tile, then its V tile
  constexpr int KT = D / 16, DT = D / 8;           // k-tiles of Q K^T, n-tiles of P V
  constexpr int kLoads = kBK * (D / 8) / (kWarps * 32);  // 16-byte pieces per thread and tile, K and V each
  extern __shared__ __align__(16) uint8_t smem[];
  T* const tiles = reinterpret_cast<T*>(smem);
  const int h = blockIdx.y, kvh = h / (H / KV), seq = blockIdx.z, q0 = (gridDim.x - 1 - blockIdx.x) * kBQ;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  q += size_t(seq) * T_ * q_stride + size_t(h) * D;

  const int r0 = q0 + 16 * warp;  // the warp's first row; lane rows r0 + g and r0 + g + 8
  const float qscale = scale * 1.4426950408889634f;
  uint32_t qf[KT][4];
#pragma unroll
  for (int kt = 0; kt < KT; ++kt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // a0..a3: rows g, g + 8, g, g + 8; columns 2c, 2c, 2c + 8, 2c + 8
      const int row = r0 + g + 8 * (i & 1), col = 16 * kt + 2 * c + 8 * (i >> 1);
      const float2 v = row < T_ ? *reinterpret_cast<const float2*>(q + size_t(row) * q_stride + col) : make_float2(0.f, 0.f);
      qf[kt][i] = pack_pair<T>(v.x * qscale, v.y * qscale);
    }

  float o[DT][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this lane's share of the row sums
  const int key_end = pos0 + min(T_, q0 + kBQ);  // causal: no row of this tile sees keys past its last row
  const int q_first = pos0 + r0, q_last = pos0 + min(r0 + 15, T_ - 1);  // the warp's positions
  // ldmatrix row addresses of this lane: K (matrices [keys +0 | +8] x [channels +0 | +8], B of two
  // n-tiles) and V (transposed: [keys +0 | +8] x [channels +0 | +8] in the other order).
  const int k_lane = ((lane % 8) + 8 * (lane / 16)) * kStride + 8 * ((lane / 8) % 2);
  const int v_lane = kBK * kStride + ((lane % 8) + 8 * ((lane / 8) % 2)) * kStride + 8 * (lane / 16);
  // Piece i of this thread: key idx / (D / 8), 8 channels at 8 (idx % (D / 8)); consecutive threads
  // on consecutive pieces of a key (coalesced).
  auto copy_tile = [&](int k0, T* stage) {  // cp.async path
    if constexpr (kAsync)
#pragma unroll
      for (int i = 0; i < 2 * kLoads; ++i) {
        const int idx = threadIdx.x + (i % kLoads) * kWarps * 32, is_v = i / kLoads, j = idx / (D / 8), key = k0 + j;
        const bool ok = key < key_end;
        cp_async16(smem_addr(stage + is_v * kBK * kStride + j * kStride + 8 * (idx % (D / 8))),
                   kv.row(is_v, seq, kvh, ok ? key : 0) + idx % (D / 8), ok);
      }
    cp_async_commit();
  };
  if constexpr (kAsync) copy_tile(0, tiles);
  for (int k0 = 0, it = 0; k0 < key_end; k0 += kBK, ++it) {
    __syncthreads();  // the tile before is no longer read (and its buffer is the one refilled next)
    T* const k_s = tiles + (kAsync ? it % 2 : 0) * kStage;
    if constexpr (kAsync) {
      if (k0 + kBK < key_end) copy_tile(k0 + kBK, tiles + (it + 1) % 2 * kStage);
      else cp_async_commit();  // an empty group: the wait below still means "this tile landed"
      cp_async_wait<1>();
    } else {
#pragma unroll
      for (int is_v = 0; is_v < 2; ++is_v) {
        typename Kv::Raw raw[kLoads];
        float2 par[kLoads];
#pragma unroll
        for (int i = 0; i < kLoads; ++i) {
          const int idx = threadIdx.x + i * kWarps * 32, key = k0 + idx / (D / 8);
          if (key < key_end) {
            raw[i] = kv.load(is_v, seq, kvh, key, idx % (D / 8));
            par[i] = kv.param(is_v, seq, kvh, key);
          }
        }
#pragma unroll
        for (int i = 0; i < kLoads; ++i) {
          const int idx = threadIdx.x + i * kWarps * 32, j = idx / (D / 8), key = k0 + j;
          float f[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          if (key < key_end) Kv::to_float(raw[i], par[i], f);
          *reinterpret_cast<uint4*>(k_s + is_v * kBK * kStride + j * kStride + 8 * (idx % (D / 8))) =
              make_uint4(pack_pair<T>(f[0], f[1]), pack_pair<T>(f[2], f[3]), pack_pair<T>(f[4], f[5]), pack_pair<T>(f[6], f[7]));
        }
      }
    }
    __syncthreads();
    if (r0 >= T_ || k0 > q_last) continue;  // uniform across the warp: no row of it sees this tile

    float s[kBK / 8][4] = {};
#pragma unroll
    for (int kt = 0; kt < KT; ++kt)
#pragma unroll
      for (int np = 0; np < kBK / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, smem_addr(k_s + k_lane + 16 * np * kStride + 16 * kt));
        mma16816<T>(s[2 * np], qf[kt][0], qf[kt][1], qf[kt][2], qf[kt][3], b[0], b[1]);
        mma16816<T>(s[2 * np + 1], qf[kt][0], qf[kt][1], qf[kt][2], qf[kt][3], b[2], b[3]);
      }
    if (k0 + kBK - 1 > q_first || k0 + kBK > key_end)
#pragma unroll
      for (int nt = 0; nt < kBK / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int key = k0 + 8 * nt + 2 * c + (i & 1), qi = q_first + g + 8 * (i >> 1);
          if (key > qi || key >= key_end) s[nt][i] = -INFINITY;
        }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {  // rows g and g + 8: registers 2 hh, 2 hh + 1
      float mx = m[hh];
#pragma unroll
      for (int nt = 0; nt < kBK / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * hh], s[nt][2 * hh + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx, corr = exp2f(m[hh] - base);
      m[hh] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBK / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) sum += (s[nt][2 * hh + e] = exp2f(s[nt][2 * hh + e] - base));
      l[hh] = l[hh] * corr + sum;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) o[dt][2 * hh] *= corr, o[dt][2 * hh + 1] *= corr;
    }
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      const uint32_t a0 = pack_pair<T>(s[2 * kk][0], s[2 * kk][1]), a1 = pack_pair<T>(s[2 * kk][2], s[2 * kk][3]);
      const uint32_t a2 = pack_pair<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), a3 = pack_pair<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, smem_addr(k_s + v_lane + 16 * kk * kStride + 16 * dp));
        mma16816<T>(o[2 * dp], a0, a1, a2, a3, b[0], b[1]);
        mma16816<T>(o[2 * dp + 1], a0, a1, a2, a3, b[2], b[3]);
      }
    }
  }
  if (r0 >= T_) return;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = r0 + g + 8 * hh;
    float sum = l[hh];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (row >= T_) continue;
    const float inv = 1.0f / sum;
    const int out_row = seq * T_ + row, ch = h * D + 2 * c;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      T* at = out + (staged_m8 ? staged_element(out_row, ch + 8 * dt, staged_m8) : size_t(out_row) * H * D + ch + 8 * dt);
      *reinterpret_cast<uint32_t*>(at) = pack_pair<T>(o[dt][2 * hh] * inv, o[dt][2 * hh + 1] * inv);
    }
  }
}

template <typename T, typename Kv>
void launch(const float* q, size_t q_stride, const Kv& kv, int B, int T_, int pos0, const int* pos_dev, int H, int KV,
            int D, float scale, T* out, cudaStream_t s, bool staged) {
  if (B < 1 || T_ < 1) return;
  if (B > 65535) fail("attention: batch {} is more than 65535 sequences", B);
  if (staged && H * D % 128) fail("attention: {} heads x {} cannot be staged for the wgmma GEMM (a multiple of 128)", H, D);
  const dim3 grid((T_ + kBQ - 1) / kBQ, H, B);
  const int staged_m8 = staged ? int(staged_rows(B * T_)) : 0;
  const auto args = std::make_tuple(q, q_stride, kv, T_, pos0, pos_dev, H, KV, scale, staged_m8, out);
  auto run = [&](auto d) {
    constexpr int kD = decltype(d)::value;
    constexpr auto kernel = attention_prefill_kernel<T, kD, Kv>;
    allow_dynamic_smem<kernel>(kSmemBytes<T, kD, Kv>);
    std::apply([&](auto... a) { launch_kernel(kernel, grid, kWarps * 32, kSmemBytes<T, kD, Kv>, s, a...); }, args);
  };
  switch (D) {
    case 32: return run(std::integral_constant<int, 32>{});
    case 64: return run(std::integral_constant<int, 64>{});
    case 128: return run(std::integral_constant<int, 128>{});
    default: fail("attention: head_dim {} is not supported on the GPU (32, 64, 128)", D);
  }
}

}  // namespace

template <typename T>
void attention_prefill(const float* q, size_t q_stride, const float* k, const float* v, size_t kv_stride, int B, int T_,
                       int H, int KV, int D, float scale, T* out, cudaStream_t s, bool staged) {
  const QkvRowsReader kv{k, v, kv_stride, T_, D};
  launch(q, q_stride, kv, B, T_, 0, nullptr, H, KV, D, scale, out, s, staged);
}

template <typename T>
void attention_prefill(const float* q, size_t q_stride, const KvLayer& cache, int B, int T_, int pos0,
                       const int* pos_dev, int H, int KV, int D, float scale, T* out, cudaStream_t s, bool staged) {
  switch (cache.bits) {
    case 16: launch(q, q_stride, CacheReader<16>{cache}, B, T_, pos0, pos_dev, H, KV, D, scale, out, s, staged); break;
    case 8: launch(q, q_stride, CacheReader<8>{cache}, B, T_, pos0, pos_dev, H, KV, D, scale, out, s, staged); break;
    case 4: launch(q, q_stride, CacheReader<4>{cache}, B, T_, pos0, pos_dev, H, KV, D, scale, out, s, staged); break;
    default: fail("attention: {} bits per KV value is not a cache format (16, 8, 4)", cache.bits);
  }
}

#define TMKIT_INSTANTIATE(T)                                                                                       \
  template void attention_prefill<T>(const float*, size_t, const float*, const float*, size_t, int, int, int, int, int, \
                                     float, T*, cudaStream_t, bool);                                                \
  template void attention_prefill<T>(const float*, size_t, const KvLayer&, int, int, int, const int*, int, int, int,  \
                                     float, T*, cudaStream_t, bool);
TMKIT_INSTANTIATE(__half)
TMKIT_INSTANTIATE(__nv_bfloat16)
#undef TMKIT_INSTANTIATE

}  // namespace tmkit::cuda
