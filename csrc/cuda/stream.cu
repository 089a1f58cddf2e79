// CUDA side of activation streaming: the same blockwise int8 codec as csrc/stream.cpp (bit for
// bit: IEEE division and multiplies without contraction, rint = round half to even), pinned
// host buffers, and copy streams ordered against torch's compute stream by events.
//
// Interop: tensors arrive as data pointers and streams as cudaStream_t handles (uintptr), e.g.
// torch.cuda.current_stream().cuda_stream; nothing here includes torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "stream_cuda.h"

namespace py = pybind11;

namespace fastdume {
namespace cuda_stream {

namespace {

constexpr float kTiny = 1e-36f;
constexpr int kThreads = 256;  // one CTA per codec block; strided when block > kThreads
constexpr int8_t kNaNCode = -128;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

void require_device() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    throw std::runtime_error(std::string("no device: ") +
                             (err != cudaSuccess ? cudaGetErrorString(err) : "no CUDA device"));
  }
}

template <class T>
__device__ __forceinline__ float load(const T* p, int64_t i);
template <>
__device__ __forceinline__ float load<float>(const float* p, int64_t i) { return p[i]; }
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <>
__device__ __forceinline__ float load<__half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}

template <class T>
__device__ __forceinline__ void store(T* p, int64_t i, float v);
template <>
__device__ __forceinline__ void store<float>(float* p, int64_t i, float v) { p[i] = v; }
template <>
__device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ void store<__half>(__half* p, int64_t i, float v) {
  p[i] = __float2half_rn(v);
}

template <class T>
__global__ void quant_kernel(const T* __restrict__ src, int64_t n, int64_t block,
                             int8_t* __restrict__ codes, float* __restrict__ scales) {
  __shared__ float warp_max[kThreads / 32];
  const int64_t b = blockIdx.x;
  const int64_t lo = b * block;
  const int64_t hi = lo + block < n ? lo + block : n;
  float m = 0.f;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    float a = fabsf(load(src, i));
    if (a < INFINITY) m = fmaxf(m, a);  // NaN and Inf do not set the scale
  }
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    m = threadIdx.x < blockDim.x / 32 ? warp_max[threadIdx.x] : 0.f;
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (threadIdx.x == 0) warp_max[0] = m;
  }
  __syncthreads();
  m = warp_max[0];
  if (!(m >= kTiny)) m = 0.f;
  const float inv = m > 0.f ? __fdiv_rn(127.f, m) : 0.f;
  if (threadIdx.x == 0) scales[b] = __fdiv_rn(m, 127.f);
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    float x = load(src, i);
    float xc = x > m ? m : (x < -m ? -m : x);
    float v = __fmul_rn(xc, inv);
    codes[i] = v != v ? kNaNCode : static_cast<int8_t>(static_cast<int>(rintf(v)));
  }
}

template <class T>
__global__ void dequant_kernel(const int8_t* __restrict__ codes, const float* __restrict__ scales,
                               int64_t n, int64_t block, T* __restrict__ dst) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += stride) {
    int8_t q = codes[i];
    float v = q == kNaNCode ? NAN : __fmul_rn(static_cast<float>(q), scales[i / block]);
    store(dst, i, v);
  }
}

void check_args(int dtype, int64_t n, int64_t block) {
  if (dtype < 0 || dtype > 2)
    throw std::invalid_argument("dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " +
                                std::to_string(dtype));
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  if (block <= 0) throw std::invalid_argument("block must be > 0, got " + std::to_string(block));
}

void quantize_int8(uintptr_t src, int dtype, int64_t n, int64_t block, uintptr_t codes,
                   uintptr_t scales, uintptr_t stream) {
  require_device();
  check_args(dtype, n, block);
  const int64_t nblocks = (n + block - 1) / block;
  if (nblocks == 0) return;
  if (nblocks > 0x7fffffffLL) throw std::invalid_argument("too many blocks; raise block");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* c = reinterpret_cast<int8_t*>(codes);
  auto* sc = reinterpret_cast<float*>(scales);
  dim3 grid(static_cast<unsigned>(nblocks));
  if (dtype == 0)
    quant_kernel<<<grid, kThreads, 0, s>>>(reinterpret_cast<const float*>(src), n, block, c, sc);
  else if (dtype == 1)
    quant_kernel<<<grid, kThreads, 0, s>>>(reinterpret_cast<const __nv_bfloat16*>(src), n, block,
                                           c, sc);
  else
    quant_kernel<<<grid, kThreads, 0, s>>>(reinterpret_cast<const __half*>(src), n, block, c, sc);
  check(cudaGetLastError(), "quantize_int8 launch");
}

void dequantize_int8(uintptr_t codes, uintptr_t scales, int64_t n, int64_t block, uintptr_t dst,
                     int dtype, uintptr_t stream) {
  require_device();
  check_args(dtype, n, block);
  if (n == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* c = reinterpret_cast<const int8_t*>(codes);
  auto* sc = reinterpret_cast<const float*>(scales);
  const int64_t want = (n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(want < 65535 * 8 ? want : 65535 * 8);
  if (dtype == 0)
    dequant_kernel<<<grid, kThreads, 0, s>>>(c, sc, n, block, reinterpret_cast<float*>(dst));
  else if (dtype == 1)
    dequant_kernel<<<grid, kThreads, 0, s>>>(c, sc, n, block,
                                             reinterpret_cast<__nv_bfloat16*>(dst));
  else
    dequant_kernel<<<grid, kThreads, 0, s>>>(c, sc, n, block, reinterpret_cast<__half*>(dst));
  check(cudaGetLastError(), "dequantize_int8 launch");
}

// Pinned host buffers, allocated once and reused (cudaHostAlloc is slow and serialising).
class PinnedPool {
 public:
  explicit PinnedPool(size_t max_buffers) : max_(max_buffers) { require_device(); }
  ~PinnedPool() {
    for (auto& b : bufs_) cudaFreeHost(b.ptr);
  }
  py::tuple acquire(size_t nbytes) {
    for (size_t i = 0; i < bufs_.size(); ++i)
      if (!bufs_[i].busy && bufs_[i].cap >= nbytes) {
        bufs_[i].busy = true;
        return py::make_tuple(i, reinterpret_cast<uintptr_t>(bufs_[i].ptr));
      }
    if (bufs_.size() >= max_)
      throw std::runtime_error("pinned pool exhausted: all " + std::to_string(max_) +
                               " buffers are in use");
    void* p = nullptr;
    check(cudaHostAlloc(&p, nbytes ? nbytes : 1, cudaHostAllocDefault), "cudaHostAlloc");
    bufs_.push_back({p, nbytes, true});
    return py::make_tuple(bufs_.size() - 1, reinterpret_cast<uintptr_t>(p));
  }
  void release(size_t id) {
    if (id >= bufs_.size() || !bufs_[id].busy)
      throw std::invalid_argument("release: pinned buffer " + std::to_string(id) +
                                  " is not in use");
    bufs_[id].busy = false;
  }
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
  CopyEngine() {
    require_device();
    check(cudaStreamCreateWithFlags(&d2h_, cudaStreamNonBlocking), "create d2h stream");
    check(cudaStreamCreateWithFlags(&h2d_, cudaStreamNonBlocking), "create h2d stream");
  }
  ~CopyEngine() {
    for (auto e : events_) cudaEventDestroy(e);
    cudaStreamDestroy(d2h_);
    cudaStreamDestroy(h2d_);
  }
  uintptr_t d2h_stream() const { return reinterpret_cast<uintptr_t>(d2h_); }
  uintptr_t h2d_stream() const { return reinterpret_cast<uintptr_t>(h2d_); }

  // Copy after everything already queued on `after`; returns the completion event id.
  int64_t copy(uintptr_t dst, uintptr_t src, size_t nbytes, bool to_host, uintptr_t after) {
    cudaStream_t s = to_host ? d2h_ : h2d_;
    cudaEvent_t ready = new_event();
    check(cudaEventRecord(ready, reinterpret_cast<cudaStream_t>(after)), "record ready");
    check(cudaStreamWaitEvent(s, ready, 0), "wait ready");
    check(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                          nbytes, to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, s),
          "cudaMemcpyAsync");
    cudaEvent_t done = new_event();
    check(cudaEventRecord(done, s), "record done");
    return static_cast<int64_t>(next_ - 1);
  }
  // Make `stream` (e.g. torch's compute stream) wait for a copy, without blocking the host.
  void stream_wait(int64_t event, uintptr_t stream) {
    check(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), get(event), 0),
          "stream wait");
  }
  void synchronize(int64_t event) {
    py::gil_scoped_release nogil;
    check(cudaEventSynchronize(get(event)), "event synchronize");
  }
  bool query(int64_t event) {
    cudaError_t err = cudaEventQuery(get(event));
    if (err == cudaErrorNotReady) {
      cudaGetLastError();
      return false;
    }
    check(err, "event query");
    return true;
  }
  // Wait for every queued copy; event ids handed out so far become invalid and are reused.
  void reset() {
    check(cudaStreamSynchronize(d2h_), "sync d2h");
    check(cudaStreamSynchronize(h2d_), "sync h2d");
    next_ = 0;
  }

 private:
  cudaEvent_t new_event() {
    if (next_ == events_.size()) {
      cudaEvent_t e;
      check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "create event");
      events_.push_back(e);
    }
    return events_[next_++];
  }
  cudaEvent_t get(int64_t id) {
    if (id < 0 || static_cast<size_t>(id) >= next_)
      throw std::invalid_argument("unknown copy event " + std::to_string(id));
    return events_[id];
  }
  cudaStream_t d2h_ = nullptr, h2d_ = nullptr;
  std::vector<cudaEvent_t> events_;
  size_t next_ = 0;
};

}  // namespace

void register_bindings(py::module_& m) {
  m.def("quantize_int8", &quantize_int8, py::arg("src"), py::arg("dtype"), py::arg("n"),
        py::arg("block"), py::arg("codes"), py::arg("scales"), py::arg("stream"),
        "Blockwise int8 codec on the device (same bits as fastdume._C), queued on `stream`.");
  m.def("dequantize_int8", &dequantize_int8, py::arg("codes"), py::arg("scales"), py::arg("n"),
        py::arg("block"), py::arg("dst"), py::arg("dtype"), py::arg("stream"));
  py::class_<PinnedPool>(m, "PinnedPool", "Reusable page-locked host buffers")
      .def(py::init<size_t>(), py::arg("max_buffers") = 8)
      .def("acquire", &PinnedPool::acquire, py::arg("nbytes"), "(id, host pointer)")
      .def("release", &PinnedPool::release, py::arg("id"))
      .def("__len__", &PinnedPool::size);
  py::class_<CopyEngine>(m, "CopyEngine", "Dedicated D2H/H2D copy streams ordered by events")
      .def(py::init<>())
      .def_property_readonly("d2h_stream", &CopyEngine::d2h_stream)
      .def_property_readonly("h2d_stream", &CopyEngine::h2d_stream)
      .def("copy", &CopyEngine::copy, py::arg("dst"), py::arg("src"), py::arg("nbytes"),
           py::arg("to_host"), py::arg("after"),
           "Queue a copy after the work queued on stream `after`; returns an event id")
      .def("stream_wait", &CopyEngine::stream_wait, py::arg("event"), py::arg("stream"))
      .def("synchronize", &CopyEngine::synchronize, py::arg("event"))
      .def("query", &CopyEngine::query, py::arg("event"))
      .def("reset", &CopyEngine::reset, "Wait for all copies and recycle their events");
}

}  // namespace cuda_stream
}  // namespace fastdume
