// The KV cache's allocation and its append kernel (layout in kv_cache.h).
//
// Append: one warp per (token row, kv head, K or V) (rope_append: per head of q, k and v); lane l
// holds the D / 32 consecutive channels l D / 32 .. (l + 1) D / 32 - 1, so that int4's channel
// pairs (2i, 2i + 1) are in one lane for D >= 64, and in lanes (2i, 2i + 1) for D = 32 (one
// shuffle). The min and max over the head's channels are warp reductions (exact in any order);
// scale, zero and codes come from kv_quant.cuh, shared with the round trip on the qkv buffer
// (explicit roundings), which is what makes the cache's dequantized values equal kv_fake_quant's
// bit for bit. Quantizing while writing means the fp32 K/V never reach memory twice; rotating
// while appending saves a decode step a kernel per layer.
#include <climits>

#include "kv_cache.h"
#include "kv_quant.cuh"
#include "rope.cuh"

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

// Warps take (token row, head) for heads first_head .. H + 2 KV - 1 of qkv: q heads (from 0), then
// K, then V. With `rope` (rope_append), a warp first adds the head's bias and rotates q and k
// (rope.cuh; pairs (2j, 2j + 1) sit in one lane for D >= 64, in lanes 2j, 2j + 1 for D = 32),
// and writes the head back, as bias_rope would; K and V heads then enter the cache.
template <typename T, int BITS>
__global__ void append_kernel(float* qkv, int rows, int T_, int H, int first_head, KvLayer c, int pos0,
                              const int* pos_dev, QkvRope<T> rope) {
  const int warp = int((blockIdx.x * size_t(blockDim.x) + threadIdx.x) / 32), lane = threadIdx.x % 32;
  const int KV = c.kv_heads, D = c.head_dim, per_lane = D / 32, heads = H + 2 * KV - first_head;
  const bool active = warp < rows * heads;  // uniform per warp
  const int row = warp / heads, head = first_head + warp % heads;  // head: q heads, then K, then V
  const int ch = lane * per_lane;
  // The bias and the rotation's frequencies are constants: loaded before the wait for the kernel
  // ahead (programmatic launch, cuda_utils.h), they cost a decode step no round trip of their own.
  float bias[4] = {}, freq[4] = {};
  if (active && rope.inv_freq)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (rope.bias && i < per_lane) bias[i] = to_float(rope.bias[size_t(head) * D + ch + i]);
      const int j = (ch + i) / 2;  // the pair of channel ch + i
      if (i < per_lane && 2 * j < rope.rot) freq[i] = rope.inv_freq[j];
    }
  pdl_begin();
  if (!active) return;
  const int seq = row / T_, pos = (pos_dev ? *pos_dev : pos0) + row % T_;
  float* x = qkv + size_t(row) * (H + 2 * KV) * D + size_t(head) * D + ch;
  // D = 128: a lane's 4 channels as one 16-byte access (prefill rows: 2.3 TB/s with scalar ones).
  __align__(16) float v[4];
  if (per_lane == 4) *reinterpret_cast<float4*>(v) = *reinterpret_cast<const float4*>(x);
  else
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = i < per_lane ? x[i] : 0.0f;

  if (rope.inv_freq) {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] += bias[i];
    if (head < H + KV) {  // q and k are rotated, v is not
      if (per_lane == 1) {  // D = 32: lane 2j holds channel 2j, lane 2j + 1 channel 2j + 1
        const float other = __shfl_xor_sync(0xffffffffu, v[0], 1);
        const int j = ch / 2;
        if (2 * j < rope.rot) {
          float a = lane % 2 ? other : v[0], b = lane % 2 ? v[0] : other;
          rope_rotate(a, b, float(pos), freq[0], rope.scale);
          v[0] = lane % 2 ? b : a;
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; i += 2) {
          const int j = (ch + i) / 2;
          if (i < per_lane && 2 * j < rope.rot) rope_rotate(v[i], v[i + 1], float(pos), freq[i], rope.scale);
        }
      }
    }
    if (per_lane == 4) *reinterpret_cast<float4*>(x) = *reinterpret_cast<const float4*>(v);
    else
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (i < per_lane) x[i] = v[i];
  }
  if (head < H) return;  // q heads: done

  const bool is_v = head >= H + KV;
  const int kvh = (head - H) % KV;
  const size_t dst_row = c.row(seq, kvh, pos);
  uint8_t* dst = (is_v ? c.v : c.k) + dst_row * c.row_bytes();
  if constexpr (BITS == 16) {
    __half* out = reinterpret_cast<__half*>(dst) + ch;
    if (per_lane == 4) {
      const __half2 lo = __floats2half2_rn(v[0], v[1]), hi = __floats2half2_rn(v[2], v[3]);
      *reinterpret_cast<uint2*>(out) = make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
    } else
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
        if (i < per_lane) dst[ch + i] = uint8_t(q[i]);
    } else if (per_lane == 1) {  // D = 32: channel pairs span two lanes
      const uint32_t odd = __shfl_down_sync(0xffffffffu, q[0], 1);
      if (lane % 2 == 0) dst[lane / 2] = uint8_t(q[0] | odd << 4);
    } else {
#pragma unroll
      for (int i = 0; i < 4; i += 2)
        if (i < per_lane) dst[(ch + i) / 2] = uint8_t(q[i] | q[i + 1] << 4);
    }
  }
}

template <typename T>
void launch_append(float* qkv, int batch, int T_, int H, int first_head, const KvLayer& cache, int pos0,
                   const int* pos_dev, const QkvRope<T>& rope, cudaStream_t s) {
  const int rows = batch * T_, warps = rows * (H + 2 * cache.kv_heads - first_head), threads = 256;
  const int blocks = int((int64_t(warps) * 32 + threads - 1) / threads);
  auto go = [&](auto kernel) {
    launch_kernel(kernel, blocks, threads, 0, s, qkv, rows, T_, H, first_head, cache, pos0, pos_dev, rope);
  };
  switch (cache.bits) {
    case 16: return go(append_kernel<T, 16>);
    case 8: return go(append_kernel<T, 8>);
    case 4: return go(append_kernel<T, 4>);
    default: fail("KV cache: {} bits per value is not a cache format (16, 8, 4)", cache.bits);
  }
}

}  // namespace

void kv_append(const float* qkv, int batch, int T_, int H, const KvLayer& cache, int pos0, const int* pos_dev,
               cudaStream_t s) {
  // Without rope the kernel only reads qkv.
  launch_append(const_cast<float*>(qkv), batch, T_, H, H, cache, pos0, pos_dev, QkvRope<__half>{}, s);
}

template <typename T>
void rope_append(float* qkv, const QkvRope<T>& rope, int batch, int T_, int H, const KvLayer& cache, int pos0,
                 const int* pos_dev, cudaStream_t s) {
  if (!rope.inv_freq) fail("rope_append: no rotary table");
  launch_append(qkv, batch, T_, H, 0, cache, pos0, pos_dev, rope, s);
}

template void rope_append<__half>(float*, const QkvRope<__half>&, int, int, int, const KvLayer&, int, const int*,
                                  cudaStream_t);
template void rope_append<__nv_bfloat16>(float*, const QkvRope<__nv_bfloat16>&, int, int, int, const KvLayer&, int,
                                         const int*, cudaStream_t);

}  // namespace tmkit::cuda
