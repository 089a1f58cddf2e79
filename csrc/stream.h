// Activation streaming on the host: blockwise int8 codec, message header, CRC32C, buffer pool.
// Plain pointers and sizes only (no torch): Python passes data_ptr()s and owns the memory.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fastdume {
namespace stream {

// Element types understood by the codec. Values are part of the wire format.
enum DType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2, kI64 = 3, kI32 = 4, kU8 = 5 };
// Payload encodings. Values are part of the wire format.
enum Codec : uint8_t { kNone = 0, kInt8 = 1 };

// The int8 code reserved for NaN; finite values use -127..127 so the grid is symmetric.
constexpr int8_t kNaNCode = -128;

size_t dtype_size(uint8_t dtype);
const char* dtype_name(uint8_t dtype);

// One scale per block of `block` consecutive elements (the last block may be short).
// scale = max|x| over the finite x of the block / 127; q = round_half_even(clamp(x) * 127/max);
// NaN -> kNaNCode; +-Inf saturate to +-max of the block's finite values (0 when it has none).
// threads: OpenMP threads to use (0 = the OpenMP default).
void quantize_int8(const void* src, uint8_t dtype, int64_t n, int64_t block, int8_t* codes,
                   float* scales, int threads = 0);
// x = q * scale in fp32, then rounded to `dtype` (round to nearest even); kNaNCode -> NaN.
void dequantize_int8(const int8_t* codes, const float* scales, int64_t n, int64_t block,
                     void* dst, uint8_t dtype, int threads = 0);

uint32_t crc32c(const void* data, size_t nbytes, uint32_t crc = 0);

// Fixed-size little-endian header that precedes every payload on the wire.
constexpr int kMaxDims = 8;
constexpr size_t kHeaderBytes = 128;
struct Header {
  uint32_t magic;  // 'FDSM'
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
constexpr uint32_t kMagic = 0x4d534446u;  // "FDSM" little-endian
constexpr uint16_t kVersion = 1;

uint64_t payload_bytes(uint8_t codec, uint8_t dtype, int64_t n, int64_t block);
void write_header(const Header& h, uint8_t* out);  // out: kHeaderBytes
// Parses and checks magic, version, header CRC and internal consistency; throws
// std::invalid_argument naming `who` (e.g. "stage 2 micro-batch 3") on failure.
Header read_header(const uint8_t* in, const std::string& who);

// Reusable, 64-byte aligned host buffers: receive buffers are allocated once per size.
class BufferPool {
 public:
  explicit BufferPool(size_t max_buffers) : max_buffers_(max_buffers) {}
  ~BufferPool();
  // Returns (id, pointer) of a free buffer of at least nbytes.
  std::pair<int64_t, uint8_t*> acquire(size_t nbytes);
  void release(int64_t id);
  size_t allocations() const { return allocations_; }
  size_t reuses() const { return reuses_; }
  size_t size() const { return bufs_.size(); }
  size_t capacity_bytes(int64_t id) const;

 private:
  struct Buf {
    uint8_t* ptr;
    size_t cap;
    bool busy;
  };
  std::vector<Buf> bufs_;
  size_t max_buffers_;
  size_t allocations_ = 0, reuses_ = 0;
};

}  // namespace stream
}  // namespace fastdume
