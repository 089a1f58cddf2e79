// Host-side staging between device and host memory: reusable page-locked buffers, and two copy
// streams whose copies are ordered against the caller's compute stream by events. Host code
// only (no kernels); fastdume/ops/stager.py builds the lifetime rules on top of it.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace fastdume {
namespace cuda {

// Pinned host buffers, allocated once and reused (cudaHostAlloc is slow and serialising).
class PinnedPool {
 public:
  // device: the CUDA device whose context allocates the buffers (-1: the current one).
  explicit PinnedPool(size_t max_buffers, int device = -1);
  ~PinnedPool();
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;
  // (id, host address) of the smallest free buffer of at least nbytes, allocating one if none
  // fits; throws std::runtime_error when all max_buffers are in use.
  std::pair<size_t, uintptr_t> acquire(size_t nbytes);
  void release(size_t id);
  size_t size() const { return bufs_.size(); }

 private:
  struct Buf {
    void* ptr;
    size_t cap;
    bool busy;
  };
  std::vector<Buf> bufs_;
  size_t max_;
};

// Two dedicated non-blocking copy streams (device->host, host->device). Each copy waits on an
// event recorded on the caller's compute stream, and records its own completion event, which
// the caller's stream (or the host) waits on: compute never blocks on the network.
class CopyEngine {
 public:
  explicit CopyEngine(int device = -1);  // device: as for PinnedPool
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;
  uintptr_t d2h_stream() const { return reinterpret_cast<uintptr_t>(d2h_); }
  uintptr_t h2d_stream() const { return reinterpret_cast<uintptr_t>(h2d_); }

  // Copy after everything already queued on stream `after`; returns the completion event id.
  int64_t copy(uintptr_t dst, uintptr_t src, size_t nbytes, bool to_host, uintptr_t after);
  // Make `stream` (e.g. torch's compute stream) wait for a copy, without blocking the host.
  void stream_wait(int64_t event, uintptr_t stream);
  void synchronize(int64_t event);  // blocks the calling host thread until the copy is done
  bool query(int64_t event);        // true once the copy is done
  // Wait for every queued copy; event ids handed out so far become invalid and are reused.
  void reset();

 private:
  cudaEvent_t new_event();
  cudaEvent_t get(int64_t id) const;
  cudaStream_t d2h_ = nullptr, h2d_ = nullptr;
  std::vector<cudaEvent_t> events_;
  size_t next_ = 0;
};

}  // namespace cuda
}  // namespace fastdume
