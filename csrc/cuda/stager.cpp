// Pinned buffers and event-ordered copy streams (see stager.h). Compiled by nvcc as host code.
#include "stager.h"

#include <stdexcept>
#include <string>

#include "runtime.h"

namespace fastdume {
namespace cuda {

namespace {
void use_device(int device) {
  require_device();
  if (device >= 0) check(cudaSetDevice(device), "cudaSetDevice");
}
}  // namespace

PinnedPool::PinnedPool(size_t max_buffers, int device) : max_(max_buffers) { use_device(device); }

PinnedPool::~PinnedPool() {
  for (auto& b : bufs_) cudaFreeHost(b.ptr);
}

std::pair<size_t, uintptr_t> PinnedPool::acquire(size_t nbytes) {
  const size_t none = bufs_.size();
  size_t best = none;  // the smallest free buffer that fits, so big ones stay for big copies
  for (size_t i = 0; i < bufs_.size(); ++i) {
    const Buf& b = bufs_[i];
    if (!b.busy && b.cap >= nbytes && (best == none || b.cap < bufs_[best].cap)) best = i;
  }
  if (best != none) {
    bufs_[best].busy = true;
    return {best, reinterpret_cast<uintptr_t>(bufs_[best].ptr)};
  }
  if (bufs_.size() >= max_)
    throw std::runtime_error("pinned pool exhausted: all " + std::to_string(max_) +
                             " buffers are in use");
  void* p = nullptr;
  check(cudaHostAlloc(&p, nbytes ? nbytes : 1, cudaHostAllocDefault), "cudaHostAlloc");
  bufs_.push_back({p, nbytes, true});
  return {bufs_.size() - 1, reinterpret_cast<uintptr_t>(p)};
}

void PinnedPool::release(size_t id) {
  if (id >= bufs_.size() || !bufs_[id].busy)
    throw std::invalid_argument("release: pinned buffer " + std::to_string(id) + " is not in use");
  bufs_[id].busy = false;
}

CopyEngine::CopyEngine(int device) {
  use_device(device);
  check(cudaStreamCreateWithFlags(&d2h_, cudaStreamNonBlocking), "create d2h stream");
  check(cudaStreamCreateWithFlags(&h2d_, cudaStreamNonBlocking), "create h2d stream");
}

CopyEngine::~CopyEngine() {
  for (auto e : events_) cudaEventDestroy(e);
  cudaStreamDestroy(d2h_);
  cudaStreamDestroy(h2d_);
}

int64_t CopyEngine::copy(uintptr_t dst, uintptr_t src, size_t nbytes, bool to_host,
                         uintptr_t after) {
  cudaStream_t s = to_host ? d2h_ : h2d_;
  cudaEvent_t ready = new_event();
  check(cudaEventRecord(ready, reinterpret_cast<cudaStream_t>(after)), "record ready");
  check(cudaStreamWaitEvent(s, ready, 0), "wait ready");
  check(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes,
                        to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, s),
        "cudaMemcpyAsync");
  cudaEvent_t done = new_event();
  check(cudaEventRecord(done, s), "record done");
  return static_cast<int64_t>(next_ - 1);
}

void CopyEngine::stream_wait(int64_t event, uintptr_t stream) {
  check(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), get(event), 0),
        "stream wait");
}

void CopyEngine::synchronize(int64_t event) {
  check(cudaEventSynchronize(get(event)), "event synchronize");
}

bool CopyEngine::query(int64_t event) {
  cudaError_t err = cudaEventQuery(get(event));
  if (err == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  check(err, "event query");
  return true;
}

void CopyEngine::reset() {
  check(cudaStreamSynchronize(d2h_), "sync d2h");
  check(cudaStreamSynchronize(h2d_), "sync h2d");
  next_ = 0;
}

cudaEvent_t CopyEngine::new_event() {
  if (next_ == events_.size()) {
    cudaEvent_t e;
    check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "create event");
    events_.push_back(e);
  }
  return events_[next_++];
}

cudaEvent_t CopyEngine::get(int64_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= next_)
    throw std::invalid_argument("unknown copy event " + std::to_string(id));
  return events_[id];
}

}  // namespace cuda
}  // namespace fastdume
