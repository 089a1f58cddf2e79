#pragma once
#include <pybind11/pybind11.h>

namespace fastdume {
namespace cuda_stream {
// Adds the streaming entry points (int8 codec kernels, pinned buffers, copy streams) to m.
void register_bindings(pybind11::module_& m);
}  // namespace cuda_stream
}  // namespace fastdume
