// Host <-> device copies for the GPU tests (a failed copy fails the test that asked for it).
#pragma once
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <vector>

#include "cuda/cuda_utils.h"

namespace tmkit::test {

template <typename V>
cuda::DeviceBuffer<V> to_device(const std::vector<V>& host) {
  cuda::DeviceBuffer<V> d(host.size());
  EXPECT_EQ(cudaMemcpy(d.get(), host.data(), host.size() * sizeof(V), cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}
template <typename V>
std::vector<V> to_host(const cuda::DeviceBuffer<V>& d, size_t n) {
  std::vector<V> host(n);
  EXPECT_EQ(cudaMemcpy(host.data(), d.get(), n * sizeof(V), cudaMemcpyDeviceToHost), cudaSuccess);
  return host;
}

}  // namespace tmkit::test
