// fastdume._C_cuda: the Python face of the CUDA code (int8 codec kernels, pinned buffers, copy
// streams); the only file of the module that knows pybind11. The CUDA runtime is linked
// statically, so importing works on machines with no driver; every entry point checks for a
// device first and reports "no device" instead of failing.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "format_bindings.h"
#include "quant.h"
#include "stager.h"
#include "version.h"

namespace py = pybind11;
namespace fc = fastdume::cuda;

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
  m.doc() = "fastdume CUDA extension: int8 codec kernels, pinned buffers, copy streams";
  m.def("version", [] { return std::string(FASTDUME_VERSION); });
  m.def("runtime_version", &runtime_version, "CUDA runtime version the module was built with");
  m.def("device_query", &device_query, "Device 0's properties, or available=False and a reason");
  fastdume::add_format_constants(m);

  m.def("quantize_int8", &fc::quantize_int8, py::arg("src"), py::arg("dtype"), py::arg("n"),
        py::arg("block"), py::arg("codes"), py::arg("scales"), py::arg("stream"),
        "Blockwise int8 codec on the device (same bits as fastdume._C), queued on `stream`.");
  m.def("dequantize_int8", &fc::dequantize_int8, py::arg("codes"), py::arg("scales"),
        py::arg("n"), py::arg("block"), py::arg("dst"), py::arg("dtype"), py::arg("stream"));

  py::class_<fc::PinnedPool>(m, "PinnedPool", "Reusable page-locked host buffers")
      .def(py::init<size_t, int>(), py::arg("max_buffers") = 8, py::arg("device") = -1)
      .def("acquire", &fc::PinnedPool::acquire, py::arg("nbytes"), "(id, host address)")
      .def("release", &fc::PinnedPool::release, py::arg("id"))
      .def("__len__", &fc::PinnedPool::size);
  py::class_<fc::CopyEngine>(m, "CopyEngine", "Dedicated D2H/H2D copy streams ordered by events")
      .def(py::init<int>(), py::arg("device") = -1)
      .def_property_readonly("d2h_stream", &fc::CopyEngine::d2h_stream)
      .def_property_readonly("h2d_stream", &fc::CopyEngine::h2d_stream)
      .def("copy", &fc::CopyEngine::copy, py::arg("dst"), py::arg("src"), py::arg("nbytes"),
           py::arg("to_host"), py::arg("after"),
           "Queue a copy after the work queued on stream `after`; returns an event id")
      .def("stream_wait", &fc::CopyEngine::stream_wait, py::arg("event"), py::arg("stream"))
      .def("synchronize", &fc::CopyEngine::synchronize, py::arg("event"),
           py::call_guard<py::gil_scoped_release>())
      .def("query", &fc::CopyEngine::query, py::arg("event"))
      .def("reset", &fc::CopyEngine::reset, "Wait for all copies and recycle their events");
}
