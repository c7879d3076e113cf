// The KV cache in device memory: its layout (KvLayer, a plain view that kernels take by value),
// its allocation (KvCache) and the append kernel that writes new tokens into it (kv_cache.cu).
// Kernels read it through kv_cache.cuh. The number formats are those of ../kv_quant.h.
//
// Layout, per layer, the same for K and for V:
//   values [batch][kv head][capacity][D]   fp16 (bits 16), or codes: uint8 (bits 8), or two codes
//                                          per byte (bits 4; channel 2i in the low nibble of byte i)
//   params [batch][kv head][capacity]      __half2 (scale, zero) of each (token, kv head); int8/int4
// Why head-major: a decode block streams one kv head's keys 0 .. pos of one sequence, so they are
// contiguous (D * bits / 8 bytes per key: 256 B for fp16 D = 128, 16 B for int4 D = 32). Every
// reader loads 8 consecutive channels at once (16, 8 or 4 bytes: one aligned vector load), which
// needs D % 8 == 0 only; the kernels support D = 32, 64, 128. Params sit apart from the codes so
// that code rows stay aligned and the params of a run of keys are one contiguous read.
#pragma once
#include <cstddef>
#include <cstdint>

#include "cuda_utils.h"

namespace tmkit::cuda {

struct KvLayer {
  uint8_t* k = nullptr;
  uint8_t* v = nullptr;
  __half2* k_param = nullptr;  // null for fp16
  __half2* v_param = nullptr;
  int bits = 16, kv_heads = 0, head_dim = 0, capacity = 0;

  __host__ __device__ size_t row_bytes() const { return size_t(head_dim) * size_t(bits) / 8; }
  // Index of the row (values) and of the param of `token` of sequence `seq`, kv head `kvh`.
  __host__ __device__ size_t row(int seq, int kvh, int token) const {
    return (size_t(seq) * size_t(kv_heads) + size_t(kvh)) * size_t(capacity) + size_t(token);
  }
};

class KvCache {
 public:
  // Room for `batch` sequences of `capacity` tokens in every layer, `bits` 16 (fp16), 8 or 4.
  // Keeps the memory when it is large enough; fails with a one-line message when the device
  // cannot hold it. True when the memory moved (CUDA graphs holding the old addresses are stale).
  bool allocate(int bits, int layers, int batch, int kv_heads, int head_dim, int64_t capacity);
  KvLayer layer(int index) const;
  // Bytes this cache's shape takes (values and params of K and V, all layers and sequences).
  size_t bytes() const { return 2 * (values_per_kv() + params_per_kv() * sizeof(__half2)); }
  int batch() const { return batch_; }
  int64_t capacity() const { return capacity_; }

 private:
  size_t values_per_kv() const;
  size_t params_per_kv() const;
  DeviceBuffer<uint8_t> k_, v_;
  DeviceBuffer<__half2> k_param_, v_param_;
  int bits_ = 16, layers_ = 0, batch_ = 0, kv_heads_ = 0, head_dim_ = 0;
  int64_t capacity_ = 0;
};

// Writes the K and V heads of qkv (fp32 rows [q: H D | k: KV D | v: KV D], after bias and RoPE) into
// the cache: row b * T + t is token t of sequence b and goes to position pos0 + t (pos0 read from
// pos_dev when given, for CUDA graphs). fp16 rounds; int8/int4 quantize per (token, kv head) exactly
// as kv_fake_quant.
void kv_append(const float* qkv, int batch, int T_, int H, const KvLayer& cache, int pos0, const int* pos_dev,
               cudaStream_t s);

// q/k/v bias and rotary table for rope_append (as bias_rope's arguments, kernels.h).
template <typename T>
struct QkvRope {
  const T* bias = nullptr;  // [(H + 2 KV) D], or null
  const float* inv_freq = nullptr;
  float scale = 1.0f;
  int rot = 0;  // channels rotated per head
};

// bias_rope followed by kv_append, in one kernel (decode steps): qkv is left as bias_rope leaves
// it, and its K and V heads enter the cache.
template <typename T>
void rope_append(float* qkv, const QkvRope<T>& rope, int batch, int T_, int H, const KvLayer& cache, int pos0,
                 const int* pos_dev, cudaStream_t s);

}  // namespace tmkit::cuda
