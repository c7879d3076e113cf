// The KV cache's allocation and its append kernel (layout in kv_cache.h).
//
// Append: one warp per (token row, kv head, K or V); lane l holds the D / 32 consecutive channels
// l D / 32 .. (l + 1) D / 32 - 1, so that int4's channel pairs (2i, 2i + 1) are in one lane for
// D >= 64, and in lanes (2i, 2i + 1) for D = 32 (one shuffle). The min and max over the head's
// channels are warp reductions (exact in any order); scale, zero and codes come from kv_quant.cuh,
// shared with the round trip on the qkv buffer (explicit roundings), which is what makes the cache's dequantized values equal
// kv_fake_quant's bit for bit. Quantizing while writing means the fp32 K/V never reach memory twice.
#include <climits>

#include "kv_cache.h"
#include "kv_quant.cuh"

namespace tmkit::cuda {

size_t KvCache::values_per_kv() const {
  return size_t(layers_) * size_t(batch_) * size_t(kv_heads_) * size_t(capacity_) * size_t(head_dim_) * size_t(bits_) / 8;
}

size_t KvCache::params_per_kv() const {
  return bits_ < 16 ? size_t(layers_) * size_t(batch_) * size_t(kv_heads_) * size_t(capacity_) : 0;
}

bool KvCache::allocate(int bits, int layers, int batch, int kv_heads, int head_dim, int64_t capacity) {
  if (bits != 16 && bits != 8 && bits != 4) fail("KV cache: {} bits per value is not a cache format (16, 8, 4)", bits);
  if (head_dim != 32 && head_dim != 64 && head_dim != 128)
    fail("KV cache: head_dim {} is not supported on the GPU (32, 64, 128)", head_dim);
  if (batch < 1 || capacity < 1) fail("KV cache: batch {} x capacity {} must both be at least 1", batch, capacity);
  if (capacity > INT_MAX / 2) fail("KV cache: capacity {} tokens is too large", capacity);
  KvCache shape;  // the new shape's sizes, checked before this cache changes
  shape.bits_ = bits, shape.layers_ = layers, shape.batch_ = batch, shape.kv_heads_ = kv_heads;
  shape.head_dim_ = head_dim, shape.capacity_ = capacity;
  const size_t held = k_.size() + v_.size() + (k_param_.size() + v_param_.size()) * sizeof(__half2);
  require_device_memory(shape.bytes(), held,
                        fmt::format("KV cache of {} sequences x {} tokens ({}-bit, {} layers)", batch, capacity, bits, layers));
  bits_ = bits, layers_ = layers, batch_ = batch, kv_heads_ = kv_heads, head_dim_ = head_dim, capacity_ = capacity;
  bool moved = k_.resize(values_per_kv());
  moved |= v_.resize(values_per_kv());
  if (bits < 16) {
    moved |= k_param_.resize(params_per_kv());
    moved |= v_param_.resize(params_per_kv());
  }
  return moved;
}

KvLayer KvCache::layer(int index) const {
  KvLayer l;
  l.bits = bits_, l.kv_heads = kv_heads_, l.head_dim = head_dim_, l.capacity = int(capacity_);
  const size_t rows = size_t(batch_) * size_t(kv_heads_) * size_t(capacity_);
  l.k = k_.get() + size_t(index) * rows * l.row_bytes();
  l.v = v_.get() + size_t(index) * rows * l.row_bytes();
  if (bits_ < 16) {
    l.k_param = k_param_.get() + size_t(index) * rows;
    l.v_param = v_param_.get() + size_t(index) * rows;
  }
  return l;
}

namespace {

template <int BITS>
__global__ void kv_append_kernel(const float* qkv, int rows, int T_, int H, KvLayer c, int pos0, const int* pos_dev) {
  const int warp = int((blockIdx.x * size_t(blockDim.x) + threadIdx.x) / 32), lane = threadIdx.x % 32;
  const int KV = c.kv_heads, D = c.head_dim, per_lane = D / 32;
  if (warp >= rows * 2 * KV) return;  // uniform per warp
  const int row = warp / (2 * KV), head = warp % (2 * KV);  // head: the K heads, then the V heads
  const bool is_v = head >= KV;
  const int kvh = head % KV, seq = row / T_, pos = (pos_dev ? *pos_dev : pos0) + row % T_;
  const float* x = qkv + size_t(row) * (H + 2 * KV) * D + size_t(H + head) * D + lane * per_lane;
  const size_t dst_row = c.row(seq, kvh, pos);
  uint8_t* dst = (is_v ? c.v : c.k) + dst_row * c.row_bytes();
  float v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = i < per_lane ? x[i] : 0.0f;

  if constexpr (BITS == 16) {
    __half* out = reinterpret_cast<__half*>(dst) + lane * per_lane;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (i < per_lane) out[i] = __float2half_rn(v[i]);
  } else {
    const KvQuantParams p = kv_quant_params(v, per_lane, BITS);
    uint32_t q[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) q[i] = uint32_t(kv_quant_code(v[i], p));
    if (lane == 0) (is_v ? c.v_param : c.k_param)[dst_row] = __halves2half2(p.scale_h, p.zero_h);
    if constexpr (BITS == 8) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (i < per_lane) dst[lane * per_lane + i] = uint8_t(q[i]);
    } else if (per_lane == 1) {  // D = 32: channel pairs span two lanes
      const uint32_t odd = __shfl_down_sync(0xffffffffu, q[0], 1);
      if (lane % 2 == 0) dst[lane / 2] = uint8_t(q[0] | odd << 4);
    } else {
#pragma unroll
      for (int i = 0; i < 4; i += 2)
        if (i < per_lane) dst[(lane * per_lane + i) / 2] = uint8_t(q[i] | q[i + 1] << 4);
    }
  }
}

}  // namespace

void kv_append(const float* qkv, int batch, int T_, int H, const KvLayer& cache, int pos0, const int* pos_dev,
               cudaStream_t s) {
  const int rows = batch * T_, warps = rows * 2 * cache.kv_heads, threads = 256;
  const int blocks = int((int64_t(warps) * 32 + threads - 1) / threads);
  switch (cache.bits) {
    case 16: kv_append_kernel<16><<<blocks, threads, 0, s>>>(qkv, rows, T_, H, cache, pos0, pos_dev); break;
    case 8: kv_append_kernel<8><<<blocks, threads, 0, s>>>(qkv, rows, T_, H, cache, pos0, pos_dev); break;
    case 4: kv_append_kernel<4><<<blocks, threads, 0, s>>>(qkv, rows, T_, H, cache, pos0, pos_dev); break;
    default: fail("KV cache: {} bits per value is not a cache format (16, 8, 4)", cache.bits);
  }
  TMKIT_CUDA_LAUNCHED();
}

}  // namespace tmkit::cuda
