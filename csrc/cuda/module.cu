// fastdume._C_cuda: CUDA side of activation streaming. The CUDA runtime is linked
// statically, so importing works on machines with no driver; every entry point
// checks for a device first and reports "no device" instead of failing.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "stream_cuda.h"
#include "version.h"

namespace py = pybind11;

namespace {

py::dict device_query() {
  py::dict info;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    info["available"] = false;
    info["count"] = 0;
    info["reason"] = err != cudaSuccess ? std::string("no device: ") + cudaGetErrorString(err)
                                        : std::string("no device");
    return info;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  info["available"] = true;
  info["count"] = count;
  info["name"] = std::string(prop.name);
  info["capability"] = py::make_tuple(prop.major, prop.minor);
  info["memory_bytes"] = static_cast<size_t>(prop.totalGlobalMem);
  info["reason"] = std::string("ok");
  return info;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastdume CUDA extension";
  m.def("version", [] { return std::string(FASTDUME_VERSION); });
  m.def("runtime_version", &runtime_version, "CUDA runtime version the module was built with");
  m.def("device_query", &device_query, "Device 0's properties, or available=False and a reason");
  fastdume::cuda_stream::register_bindings(m);
}
