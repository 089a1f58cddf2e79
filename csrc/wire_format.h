// The activation-streaming format, in one place: element-type and codec codes, the int8 codec's
// constants and the fixed 128-byte message header. Included by the host code (quant.cpp,
// wire.cpp) and the CUDA code (cuda/quant.cu) alike, so both encode the same bits. The values are
// part of the wire format; fastdume/ops/quant.py and ops/wire.py mirror them, and
// tests/test_wire.py checks that both extensions export the same numbers as Python.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastdume {
namespace wire {

// Element types of a message's tensor (the codec accepts the three float ones).
enum DType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2, kI64 = 3, kI32 = 4, kU8 = 5 };
// Payload encodings.
enum Codec : uint8_t { kNone = 0, kInt8 = 1 };

// int8 codec: one fp32 scale per block of kDefaultBlock (or the caller's) consecutive elements.
constexpr int64_t kDefaultBlock = 256;
// The int8 code reserved for NaN; finite values use -127..127 so the grid is symmetric.
constexpr int8_t kNaNCode = -128;
// Below this finite max a block encodes as zeros: 127/max would overflow fp32.
constexpr float kTiny = 1e-36f;

inline bool is_float(uint8_t dtype) { return dtype == kF32 || dtype == kBF16 || dtype == kF16; }

inline const char* dtype_name(uint8_t dtype) {
  switch (dtype) {
    case kF32: return "float32";
    case kBF16: return "bfloat16";
    case kF16: return "float16";
    case kI64: return "int64";
    case kI32: return "int32";
    case kU8: return "uint8";
  }
  return "unknown";
}

inline size_t dtype_size(uint8_t dtype) {
  switch (dtype) {
    case kF32: case kI32: return 4;
    case kBF16: case kF16: return 2;
    case kI64: return 8;
    case kU8: return 1;
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(dtype));
}

// The int8 codec's argument checks, shared so host and device refuse the same calls.
inline void check_codec_args(uint8_t dtype, int64_t n, int64_t block) {
  if (!is_float(dtype))
    throw std::invalid_argument("dtype must be float32, bfloat16 or float16 for int8, got " +
                                std::string(dtype_name(dtype)));
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  if (block <= 0) throw std::invalid_argument("block must be > 0, got " + std::to_string(block));
}

// Fixed-size little-endian header that precedes every payload on the wire. The byte layout is
// this struct's on x86-64 and aarch64 (natural alignment, no packing pragmas), zero-padded to
// kHeaderBytes; tests/test_wire.py rebuilds it with Python's struct module.
constexpr int kMaxDims = 8;
constexpr size_t kHeaderBytes = 128;
constexpr uint32_t kMagic = 0x4d534446u;  // "FDSM" little-endian
constexpr uint16_t kVersion = 1;
struct Header {
  uint32_t magic;  // kMagic
  uint16_t version;
  uint8_t dtype;  // dtype of the tensor the receiver restores
  uint8_t codec;
  uint8_t ndim;
  uint8_t reserved[3];
  uint32_t block;  // codec block size (0 for kNone)
  int32_t stage;   // sending stage
  int32_t micro_batch;
  int64_t step;
  int64_t shape[kMaxDims];
  uint64_t payload_bytes;
  uint32_t payload_crc;
  uint32_t header_crc;  // CRC32C of the bytes above, so a torn header is caught too
};
static_assert(sizeof(Header) <= kHeaderBytes, "header grew past its wire size");

// Payload size of a message: n elements as they are, or int8 codes plus one fp32 scale per block.
inline uint64_t payload_bytes(uint8_t codec, uint8_t dtype, int64_t n, int64_t block) {
  if (codec == kNone) return static_cast<uint64_t>(n) * dtype_size(dtype);
  if (codec == kInt8) {
    check_codec_args(dtype, n, block);
    return static_cast<uint64_t>((n + block - 1) / block) * 4 + static_cast<uint64_t>(n);
  }
  throw std::invalid_argument("codec must be 0 (none) or 1 (int8), got " + std::to_string(codec));
}

}  // namespace wire
}  // namespace fastdume
