// The KV cache's allocation and its append kernel (layout in kv_cache.h): one warp per (token row,
// kv head, K or V), or with rope_append per head of q, k and v (rope_append.cuh). Quantizing while
// writing means the fp32 K/V never reach memory twice; rotating while appending saves a decode
// step a kernel per layer.
#include <climits>

#include "kv_cache.h"
#include "rope_append.cuh"

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
// K, then V (rope_append_head, rope_append.cuh).
template <typename T, int BITS>
__global__ void append_kernel(float* qkv, int rows, int T_, int H, int first_head, KvLayer c, int pos0,
                              const int* pos_dev, QkvRope<T> rope) {
  const int warp = int((blockIdx.x * size_t(blockDim.x) + threadIdx.x) / 32), lane = threadIdx.x % 32;
  const int KV = c.kv_heads, heads = H + 2 * KV - first_head;
  const bool active = warp < rows * heads;  // uniform per warp
  const int row = warp / heads, head = first_head + warp % heads;  // head: q heads, then K, then V
  // The bias and the rotation's frequencies are constants: loaded before the wait for the kernel
  // ahead (programmatic launch, cuda_utils.h), they cost a decode step no round trip of their own.
  const HeadRope hr = active ? head_rope(rope, head, c.head_dim, lane) : HeadRope{};
  pdl_begin();
  if (!active) return;
  const int pos = (pos_dev ? *pos_dev : pos0) + row % T_;
  rope_append_head<T, BITS>(qkv + size_t(row) * (H + 2 * KV) * c.head_dim, H, head, row / T_, pos, c, rope, hr, lane);
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
