// fastdume._C: host-side helpers with no torch dependency (pointers in, pointers out).
#include <pybind11/pybind11.h>

#include "version.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdume C++ extension (CPU)";
  m.def("version", [] { return std::string(FASTDUME_VERSION); });
  m.def("openmp_threads", &fastdume::openmp_threads,
        "Threads OpenMP would use for a parallel region (1 without OpenMP).");
}
