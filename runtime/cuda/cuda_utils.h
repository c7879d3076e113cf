// CUDA plumbing shared by the kernels and the GPU model: checked calls, device buffers, and the
// element types (the workspace's fp16 or bf16) the kernels are instantiated for.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "error.h"

#define TMKIT_CUDA_CHECK(expr)                                                                            \
  do {                                                                                                     \
    cudaError_t err_ = (expr);                                                                             \
    if (err_ != cudaSuccess) ::tmkit::fail("CUDA error at {}:{}: {}", __FILE__, __LINE__, cudaGetErrorString(err_)); \
  } while (0)

#define TMKIT_CUBLAS_CHECK(expr)                                                                          \
  do {                                                                                                     \
    cublasStatus_t st_ = (expr);                                                                           \
    if (st_ != CUBLAS_STATUS_SUCCESS) ::tmkit::fail("cuBLAS error {} at {}:{}", int(st_), __FILE__, __LINE__); \
  } while (0)

// After every launch: a bad configuration shows here, a fault at the next synchronization.
#define TMKIT_CUDA_LAUNCHED() TMKIT_CUDA_CHECK(cudaGetLastError())

namespace tmkit::cuda {

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { resize(n); }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), n_(o.n_) { o.ptr_ = nullptr; o.n_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(n_, o.n_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // Grows to at least n elements (contents are not kept); true when the memory moved.
  bool resize(size_t n) {
    if (n <= n_) return false;
    cudaFree(ptr_);
    ptr_ = nullptr;
    n_ = 0;
    TMKIT_CUDA_CHECK(cudaMalloc(&ptr_, n * sizeof(T)));
    n_ = n;
    return true;
  }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// Fails with one line naming `what` (the consumer and the way out) when `needed` bytes cannot be
// had: `held` of them are already allocated to the buffers about to be replaced, the rest must be
// free. Checked before allocating so that users see this, not cudaMalloc's "out of memory".
inline void require_device_memory(size_t needed, size_t held, const std::string& what) {
  if (needed <= held) return;
  size_t free = 0, total = 0;
  TMKIT_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  if (needed > free + held)
    fail("{}: needs {:.1f} MiB of device memory, {:.1f} MiB available", what, double(needed) / (1 << 20),
         double(free + held) / (1 << 20));
}

// Multiprocessors of the current device (persistent grids size themselves by it).
inline int sm_count() {
  int dev = 0, count = 0;
  TMKIT_CUDA_CHECK(cudaGetDevice(&dev));
  TMKIT_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
  return count;
}

// Lets `Kernel` take `bytes` of dynamic shared memory (more than the default 48 KiB needs it): an
// attribute of each device's copy of the kernel, so set once per kernel and device (tensor
// parallelism runs it on several).
template <auto Kernel>
void allow_dynamic_smem(int bytes) {
  static std::atomic<uint64_t> configured{0};
  int dev = 0;
  TMKIT_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && (configured.load() >> dev & 1)) return;
  TMKIT_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (dev < 64) configured.fetch_or(uint64_t(1) << dev);
}

// Programmatic dependent launch (Hopper): a kernel started by launch_kernel() may be scheduled while the
// kernel before it on the stream is still running, so that its launch latency, and whatever it
// can do without the previous kernel's results (the W4A16 stream fetching weights), overlap that
// kernel's tail. Such a kernel must call pdl_begin() (device, below) in every thread before it
// reads anything an earlier kernel wrote and before it writes to global memory: the wait there is
// what orders it after its predecessor, and, each kernel waiting before it lets the next one
// start, it orders the whole chain (no more than two kernels are ever in flight). Only launches
// captured into a CUDA graph (decode steps) go this way: launched eagerly, the same kernels made
// small-llama's prefill 40% slower (pp512 345k vs 580k t/s, H200), while its graph-replayed
// decode gained 33%. TMKIT_PDL=0 launches plainly, for comparison; kernels launched with <<<>>>
// are unaffected (the wait is a no-op for them, and they wait for the whole of the kernel before).
// The runtime's switches for comparisons (TMKIT_PDL, TMKIT_DENSE_GEMV, ...): on unless set to "0".
inline bool switch_on(const char* name) {
  const char* e = std::getenv(name);
  return !(e && std::strcmp(e, "0") == 0);
}
inline bool programmatic_launch_enabled() {
  static const bool on = switch_on("TMKIT_PDL");
  return on;
}

// launch_kernel() in thread-block clusters of `cluster` blocks (each grid dimension a multiple of
// the cluster's; {1, 1, 1}: no clusters).
template <typename... Params, typename... Args>
void launch_kernel_clusters(void (*kernel)(Params...), dim3 grid, dim3 cluster, dim3 block, size_t smem, cudaStream_t s,
                            Args&&... args) {
  cudaLaunchAttribute attrs[2]{};
  attrs[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  TMKIT_CUDA_CHECK(cudaStreamIsCapturing(s, &capture));
  attrs[0].val.programmaticStreamSerializationAllowed =
      programmatic_launch_enabled() && capture == cudaStreamCaptureStatusActive ? 1 : 0;
  attrs[1].id = cudaLaunchAttributeClusterDimension;
  attrs[1].val.clusterDim.x = cluster.x;
  attrs[1].val.clusterDim.y = cluster.y;
  attrs[1].val.clusterDim.z = cluster.z;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = s;
  config.attrs = attrs;
  config.numAttrs = cluster.x * cluster.y * cluster.z > 1 ? 2 : 1;
  TMKIT_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, Params(std::forward<Args>(args))...));
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args&&... args) {
  launch_kernel_clusters(kernel, grid, dim3(1, 1, 1), block, smem, s, std::forward<Args>(args)...);
}

#ifdef __CUDACC__
// Waits until the kernel before this one on the stream has finished and its writes are visible,
// then lets the kernel after this one be scheduled (launch_kernel() above).
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#endif

template <typename T> struct TypeOf;
template <> struct TypeOf<__half> { static constexpr cudaDataType_t value = CUDA_R_16F; };
template <> struct TypeOf<__nv_bfloat16> { static constexpr cudaDataType_t value = CUDA_R_16BF; };

__host__ __device__ inline float to_float(__half x) { return __half2float(x); }
__host__ __device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __host__ __device__ inline T from_float(float x);
template <> __host__ __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

#ifdef __CUDACC__
// Eight consecutive T (16 bytes: one vector load) as floats.
template <typename T>
__device__ inline void to_float8(const uint4& v, float (&f)[8]) {
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_float(e[i]);
}
#endif

}  // namespace tmkit::cuda
