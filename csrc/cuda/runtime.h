// CUDA runtime error handling shared by the CUDA module's files. The runtime is linked
// statically, so the module imports on machines with no driver; every entry point calls
// require_device() first and reports "no device" instead of failing.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastdume {
namespace cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the error so later calls start clean
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

inline void require_device() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    throw std::runtime_error(std::string("no device: ") +
                             (err != cudaSuccess ? cudaGetErrorString(err) : "no CUDA device"));
  }
}

}  // namespace cuda
}  // namespace fastdume
