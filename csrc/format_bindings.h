// Exports the constants of wire_format.h to Python; both extension modules call this, so
// tests can check that fastdume._C, fastdume._C_cuda and fastdume.ops agree on every number.
#pragma once
#include <pybind11/pybind11.h>

#include "wire_format.h"

namespace fastdume {

inline void add_format_constants(pybind11::module_& m) {
  namespace fw = fastdume::wire;
  m.attr("HEADER_BYTES") = fw::kHeaderBytes;
  m.attr("MAX_DIMS") = fw::kMaxDims;
  m.attr("MAGIC") = fw::kMagic;
  m.attr("WIRE_VERSION") = fw::kVersion;
  m.attr("DEFAULT_BLOCK") = fw::kDefaultBlock;
  m.attr("NAN_CODE") = static_cast<int>(fw::kNaNCode);
  m.attr("TINY") = fw::kTiny;
  pybind11::dict dtypes;
  for (uint8_t code : {fw::kF32, fw::kBF16, fw::kF16, fw::kI64, fw::kI32, fw::kU8})
    dtypes[fw::dtype_name(code)] = code;
  m.attr("DTYPE_CODES") = dtypes;
  pybind11::dict codecs;
  codecs["none"] = static_cast<uint8_t>(fw::kNone);
  codecs["int8"] = static_cast<uint8_t>(fw::kInt8);
  m.attr("CODEC_CODES") = codecs;
}

}  // namespace fastdume
