// Wire messages on the host: CRC32C (SSE4.2 when present), the checked header, buffer pool.
#include "wire.h"

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

namespace fastdume {
namespace wire {

// ---- CRC32C (Castagnoli): SSE4.2 instruction when present, a byte table otherwise ----

namespace {
__attribute__((target("sse4.2"))) uint32_t crc32c_hw(const uint8_t* p, size_t n, uint32_t c) {
  uint64_t c64 = c;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c64 = __builtin_ia32_crc32di(c64, w);
    p += 8;
    n -= 8;
  }
  c = static_cast<uint32_t>(c64);
  while (n--) c = __builtin_ia32_crc32qi(c, *p++);
  return c;
}

uint32_t crc32c_sw(const uint8_t* p, size_t n, uint32_t c) {
  static uint32_t table[256];
  static bool ready = [] {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t r = i;
      for (int k = 0; k < 8; ++k) r = (r >> 1) ^ (0x82F63B78u & (0u - (r & 1u)));
      table[i] = r;
    }
    return true;
  }();
  (void)ready;
  while (n--) c = table[(c ^ *p++) & 0xffu] ^ (c >> 8);
  return c;
}
}  // namespace

uint32_t crc32c(const void* data, size_t nbytes, uint32_t crc) {
  static const bool hw = __builtin_cpu_supports("sse4.2");
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
  c = hw ? crc32c_hw(p, nbytes, c) : crc32c_sw(p, nbytes, c);
  return ~c;
}

// ---- message header ----

void write_header(const Header& h, uint8_t* out) {
  std::memset(out, 0, kHeaderBytes);
  Header copy = h;
  copy.magic = kMagic;
  copy.version = kVersion;
  copy.header_crc = 0;
  std::memcpy(out, &copy, sizeof(Header));
  copy.header_crc = crc32c(out, offsetof(Header, header_crc));
  std::memcpy(out, &copy, sizeof(Header));
}

Header read_header(const uint8_t* in, const std::string& who) {
  Header h;
  std::memcpy(&h, in, sizeof(Header));
  auto fail = [&](const std::string& what) {
    throw std::invalid_argument("corrupt message header from " + who + ": " + what);
  };
  if (h.magic != kMagic) fail("bad magic (not a fastdume stream message)");
  if (h.version != kVersion)
    fail("wire version " + std::to_string(h.version) + ", expected " + std::to_string(kVersion));
  uint32_t crc = crc32c(in, offsetof(Header, header_crc));
  if (crc != h.header_crc) fail("header checksum mismatch");
  if (h.ndim > kMaxDims) fail("ndim " + std::to_string(h.ndim) + " > " + std::to_string(kMaxDims));
  int64_t n = 1;
  for (int d = 0; d < h.ndim; ++d) {
    if (h.shape[d] < 0) fail("negative dimension");
    n *= h.shape[d];
  }
  if (h.codec == kInt8 && h.block == 0) fail("int8 payload with block 0");
  if (payload_bytes(h.codec, h.dtype, n, h.block) != h.payload_bytes)
    fail("payload size " + std::to_string(h.payload_bytes) + " does not match shape and codec");
  return h;
}

// ---- buffer pool ----

BufferPool::~BufferPool() {
  for (auto& b : bufs_) std::free(b.ptr);
}

std::pair<int64_t, uint8_t*> BufferPool::acquire(size_t nbytes) {
  int64_t best = -1, grow = -1;
  for (size_t i = 0; i < bufs_.size(); ++i) {
    if (bufs_[i].busy) continue;
    if (bufs_[i].cap >= nbytes && (best < 0 || bufs_[i].cap < bufs_[best].cap)) best = i;
    if (bufs_[i].cap < nbytes) grow = i;
  }
  if (best >= 0) {
    bufs_[best].busy = true;
    ++reuses_;
    return {best, bufs_[best].ptr};
  }
  const size_t cap = ((nbytes ? nbytes : 1) + 63) / 64 * 64;
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(64, cap));
  if (p == nullptr) throw std::bad_alloc();
  ++allocations_;
  if (bufs_.size() < max_buffers_) {
    bufs_.push_back({p, cap, true});
    return {static_cast<int64_t>(bufs_.size() - 1), p};
  }
  if (grow < 0) {
    std::free(p);
    throw std::runtime_error("buffer pool exhausted: all " + std::to_string(max_buffers_) +
                             " buffers are in use (release them after each message)");
  }
  std::free(bufs_[grow].ptr);  // replace a free buffer that is too small
  bufs_[grow] = {p, cap, true};
  return {grow, p};
}

void BufferPool::release(int64_t id) {
  if (id < 0 || static_cast<size_t>(id) >= bufs_.size() || !bufs_[id].busy)
    throw std::invalid_argument("release: buffer id " + std::to_string(id) + " is not in use");
  bufs_[id].busy = false;
}

size_t BufferPool::capacity_bytes(int64_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= bufs_.size())
    throw std::invalid_argument("buffer id " + std::to_string(id) + " out of range");
  return bufs_[id].cap;
}

}  // namespace wire
}  // namespace fastdume
