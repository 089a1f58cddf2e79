// Wire messages on the host: CRC32C, writing and checking the header of wire_format.h, and the
// reusable host buffers messages are built and received in. Plain pointers and sizes only.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "wire_format.h"

namespace fastdume {
namespace wire {

uint32_t crc32c(const void* data, size_t nbytes, uint32_t crc = 0);

void write_header(const Header& h, uint8_t* out);  // out: kHeaderBytes; sets magic, version, CRC
// Parses and checks magic, version, header CRC and internal consistency; throws
// std::invalid_argument naming `who` (e.g. "stage 2 micro-batch 3") on failure.
Header read_header(const uint8_t* in, const std::string& who);

// Reusable, 64-byte aligned host buffers: receive buffers are allocated once per size.
class BufferPool {
 public:
  explicit BufferPool(size_t max_buffers) : max_buffers_(max_buffers) {}
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;
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

}  // namespace wire
}  // namespace fastdume
