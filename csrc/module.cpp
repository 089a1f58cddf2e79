// fastdume._C: host-side helpers with no torch dependency (pointers in, pointers out).
// Pointers arrive as Python ints (tensor.data_ptr()); the caller keeps the memory alive and
// sized. Heavy calls release the GIL so communication threads keep running.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "format_bindings.h"
#include "quant.h"
#include "version.h"
#include "wire.h"

namespace py = pybind11;
namespace fw = fastdume::wire;
namespace fq = fastdume::quant;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

py::bytes header_bytes(uint8_t dtype, uint8_t codec, const std::vector<int64_t>& shape,
                       uint32_t block, int32_t stage, int32_t micro_batch, int64_t step,
                       uint64_t payload_bytes, uint32_t payload_crc) {
  if (shape.size() > static_cast<size_t>(fw::kMaxDims))
    throw std::invalid_argument("shape must have at most " + std::to_string(fw::kMaxDims) +
                                " dims, got " + std::to_string(shape.size()));
  fw::dtype_size(dtype);  // validates the code
  fw::Header h{};
  h.dtype = dtype;
  h.codec = codec;
  h.ndim = static_cast<uint8_t>(shape.size());
  h.block = block;
  h.stage = stage;
  h.micro_batch = micro_batch;
  h.step = step;
  for (size_t d = 0; d < shape.size(); ++d) h.shape[d] = shape[d];
  h.payload_bytes = payload_bytes;
  h.payload_crc = payload_crc;
  char out[fw::kHeaderBytes];
  fw::write_header(h, reinterpret_cast<uint8_t*>(out));
  return py::bytes(out, fw::kHeaderBytes);
}

py::dict parse_header(uintptr_t p, const std::string& who) {
  fw::Header h = fw::read_header(ptr<const uint8_t>(p), who);
  py::dict d;
  d["dtype"] = h.dtype;
  d["codec"] = h.codec;
  d["block"] = h.block;
  d["stage"] = h.stage;
  d["micro_batch"] = h.micro_batch;
  d["step"] = h.step;
  std::vector<int64_t> shape(h.shape, h.shape + h.ndim);
  d["shape"] = shape;
  d["payload_bytes"] = h.payload_bytes;
  d["payload_crc"] = h.payload_crc;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdume C++ extension (CPU): int8 codec, wire header, CRC32C, buffer pool";
  m.def("version", [] { return std::string(FASTDUME_VERSION); });
  m.def("openmp_threads", &fastdume::openmp_threads,
        "Threads OpenMP would use for a parallel region (1 without OpenMP).");

  fastdume::add_format_constants(m);
  m.def(
      "quantize_int8",
      [](uintptr_t src, uint8_t dtype, int64_t n, int64_t block, uintptr_t codes,
         uintptr_t scales, int threads) {
        fq::quantize_int8(ptr<const void>(src), dtype, n, block, ptr<int8_t>(codes),
                          ptr<float>(scales), threads);
      },
      py::arg("src"), py::arg("dtype"), py::arg("n"), py::arg("block"), py::arg("codes"),
      py::arg("scales"), py::arg("threads") = 0, py::call_guard<py::gil_scoped_release>(),
      "Blockwise int8: codes[n] int8 and scales[ceil(n/block)] fp32 from src (dtype code).");
  m.def(
      "dequantize_int8",
      [](uintptr_t codes, uintptr_t scales, int64_t n, int64_t block, uintptr_t dst,
         uint8_t dtype, int threads) {
        fq::dequantize_int8(ptr<const int8_t>(codes), ptr<const float>(scales), n, block,
                            ptr<void>(dst), dtype, threads);
      },
      py::arg("codes"), py::arg("scales"), py::arg("n"), py::arg("block"), py::arg("dst"),
      py::arg("dtype"), py::arg("threads") = 0, py::call_guard<py::gil_scoped_release>(),
      "Inverse of quantize_int8, writing n elements of dtype to dst.");
  m.def(
      "crc32c",
      [](uintptr_t p, size_t nbytes, uint32_t crc) {
        return fw::crc32c(ptr<const void>(p), nbytes, crc);
      },
      py::arg("ptr"), py::arg("nbytes"), py::arg("crc") = 0,
      py::call_guard<py::gil_scoped_release>(), "CRC32C (Castagnoli) of nbytes at ptr.");
  m.def("payload_bytes", &fw::payload_bytes, py::arg("codec"), py::arg("dtype"), py::arg("n"),
        py::arg("block"));
  m.def("header_bytes", &header_bytes, py::arg("dtype"), py::arg("codec"), py::arg("shape"),
        py::arg("block"), py::arg("stage"), py::arg("micro_batch"), py::arg("step"),
        py::arg("payload_bytes"), py::arg("payload_crc"),
        "The fixed-size wire header (bytes) for one message.");
  m.def("parse_header", &parse_header, py::arg("ptr"), py::arg("who"),
        "Parse and check a header at ptr; ValueError naming `who` when it is corrupt.");

  py::class_<fw::BufferPool>(m, "BufferPool",
                             "Reusable 64-byte aligned host buffers (allocated once per size).")
      .def(py::init<size_t>(), py::arg("max_buffers") = 8)
      .def(
          "acquire",
          [](py::object self, size_t nbytes) {
            auto& pool = self.cast<fw::BufferPool&>();
            auto [id, p] = pool.acquire(nbytes);
            // The array views pool memory and keeps the pool alive; valid until release(id).
            py::array_t<uint8_t> arr({static_cast<py::ssize_t>(nbytes)}, {1}, p, self);
            return py::make_tuple(id, arr);
          },
          py::arg("nbytes"), "(id, uint8 numpy array of nbytes) valid until release(id)")
      .def("release", &fw::BufferPool::release, py::arg("id"))
      .def("capacity_bytes", &fw::BufferPool::capacity_bytes, py::arg("id"))
      .def_property_readonly("allocations", &fw::BufferPool::allocations)
      .def_property_readonly("reuses", &fw::BufferPool::reuses)
      .def("__len__", &fw::BufferPool::size);
}
