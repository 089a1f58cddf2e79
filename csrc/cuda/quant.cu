// The int8 codec kernels: the same bits as csrc/quant.cpp (IEEE division and multiplies without
// contraction, rint = round half to even). Constants and codes come from wire_format.h.
//
// quant_kernel: one CTA of kThreads per codec block (a strided loop when block > kThreads): a
// warp-shuffle max over the block's finite values, then scale and round; one launch per tensor.
// dequant_kernel: a grid-stride loop over elements, one launch per tensor.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "quant.h"
#include "runtime.h"
#include "wire_format.h"

namespace fastdume {
namespace cuda {

namespace {

using wire::kNaNCode;
using wire::kTiny;
constexpr int kThreads = 256;  // CTA size, independent of the codec block size

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

}  // namespace

void quantize_int8(uintptr_t src, uint8_t dtype, int64_t n, int64_t block, uintptr_t codes,
                   uintptr_t scales, uintptr_t stream) {
  require_device();
  wire::check_codec_args(dtype, n, block);
  const int64_t nblocks = (n + block - 1) / block;
  if (nblocks == 0) return;
  if (nblocks > 0x7fffffffLL) throw std::invalid_argument("too many blocks; raise block");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* c = reinterpret_cast<int8_t*>(codes);
  auto* sc = reinterpret_cast<float*>(scales);
  dim3 grid(static_cast<unsigned>(nblocks));
  if (dtype == wire::kF32)
    quant_kernel<<<grid, kThreads, 0, s>>>(reinterpret_cast<const float*>(src), n, block, c, sc);
  else if (dtype == wire::kBF16)
    quant_kernel<<<grid, kThreads, 0, s>>>(reinterpret_cast<const __nv_bfloat16*>(src), n, block,
                                           c, sc);
  else
    quant_kernel<<<grid, kThreads, 0, s>>>(reinterpret_cast<const __half*>(src), n, block, c, sc);
  check(cudaGetLastError(), "quantize_int8 launch");
}

void dequantize_int8(uintptr_t codes, uintptr_t scales, int64_t n, int64_t block, uintptr_t dst,
                     uint8_t dtype, uintptr_t stream) {
  require_device();
  wire::check_codec_args(dtype, n, block);
  if (n == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* c = reinterpret_cast<const int8_t*>(codes);
  auto* sc = reinterpret_cast<const float*>(scales);
  const int64_t want = (n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(want < 65535 * 8 ? want : 65535 * 8);
  if (dtype == wire::kF32)
    dequant_kernel<<<grid, kThreads, 0, s>>>(c, sc, n, block, reinterpret_cast<float*>(dst));
  else if (dtype == wire::kBF16)
    dequant_kernel<<<grid, kThreads, 0, s>>>(c, sc, n, block,
                                             reinterpret_cast<__nv_bfloat16*>(dst));
  else
    dequant_kernel<<<grid, kThreads, 0, s>>>(c, sc, n, block, reinterpret_cast<__half*>(dst));
  check(cudaGetLastError(), "dequantize_int8 launch");
}

}  // namespace cuda
}  // namespace fastdume
