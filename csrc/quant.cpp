// The int8 codec on the host. One fused pass per block (max, then scale and round) so a tensor
// is read twice and written once, split over OpenMP threads by whole blocks; the hot loops are
// compiled twice (AVX2+F16C and baseline) and picked at run time.
#include "quant.h"

#include "version.h"

// Nobody reads the FP exception flags here; without this GCC refuses to if-convert (and so to
// vectorise) the NaN selects, since the unselected multiply "might trap". Results are unchanged.
#pragma GCC optimize("no-trapping-math")

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastdume {
namespace quant {

namespace {

using wire::check_codec_args;
using wire::kBF16;
using wire::kF32;
using wire::kNaNCode;
using wire::kTiny;
// Adding then subtracting 1.5*2^23 rounds |v| < 2^22 to an integer, half to even, in plain
// SSE/AVX arithmetic (no libm call), exactly as torch.round does.
constexpr float kRound = 12582912.0f;
// Parallelise only when each thread gets enough work to pay for waking it.
constexpr int64_t kParallelMin = 1 << 18;

struct F32 {
  using T = float;
  static inline float load(const T* p, int64_t i) { return p[i]; }
  static inline void store(T* p, int64_t i, float v) { p[i] = v; }
};
struct BF16 {
  using T = uint16_t;
  static inline float load(const T* p, int64_t i) {
    uint32_t u = static_cast<uint32_t>(p[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline void store(T* p, int64_t i, float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    uint16_t nan = static_cast<uint16_t>((u >> 16) | 0x0040u);
    uint16_t rne = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    p[i] = (u & 0x7fffffffu) > 0x7f800000u ? nan : rne;
  }
};
// IEEE half <-> float with integer and fp32 arithmetic only, so loops over it vectorise
// (GCC does not vectorise _Float16 conversions without AVX-512 FP16). Exact, round to nearest
// even, subnormals, Inf and NaN included: the same bits as torch's conversions.
struct F16 {
  using T = uint16_t;
  static inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
  }
  static inline float load(const T* p, int64_t i) {
    const uint32_t h = p[i];
    const uint32_t sign = (h & 0x8000u) << 16, em = h & 0x7fffu;
    // shifting exponent+mantissa into place and scaling by 2^112 rebias normals and
    // subnormals alike; exponent 31 (Inf/NaN) maps to 255 instead
    const float scaled = bits_to_float(em << 13) * 0x1p112f;
    const uint32_t special = (em << 13) | 0x7f800000u;
    const uint32_t u = em >= 0x7c00u ? special : float_to_bits(scaled);
    return bits_to_float(u | sign);
  }
  static inline void store(T* p, int64_t i, float v) {
    uint32_t f = float_to_bits(v);
    const uint32_t sign = f & 0x80000000u;
    f ^= sign;
    // overflow (>= 2^16) and Inf/NaN
    const uint32_t big = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
    // results that are half subnormals: let an fp32 add with 0.5 do the rounding
    const uint32_t sub = float_to_bits(bits_to_float(f) + 0.5f) - 0x3f000000u;
    // normals: rebias the exponent, add the rounding bias (ties to even) and truncate
    const uint32_t norm = (f + 0xc8000fffu + ((f >> 13) & 1u)) >> 13;
    const uint32_t h = f >= 0x47800000u ? big : (f < 0x38800000u ? sub : norm);
    p[i] = static_cast<uint16_t>(h | (sign >> 16));
  }
};

template <class Tr>
inline void quant_blocks(const void* vsrc, int64_t n, int64_t block, int64_t b0, int64_t b1,
                         int8_t* codes, float* scales) {
  const auto* src = static_cast<const typename Tr::T*>(vsrc);
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = b * block, hi = lo + block < n ? lo + block : n;
    float m = 0.f;
#pragma omp simd reduction(max : m)
    for (int64_t i = lo; i < hi; ++i) {
      float a = std::fabs(Tr::load(src, i));
      a = a < inf ? a : 0.f;  // NaN and Inf do not set the scale
      m = a > m ? a : m;
    }
    if (!(m >= kTiny)) m = 0.f;
    const float inv = m > 0.f ? 127.f / m : 0.f;
    scales[b] = m / 127.f;
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      float x = Tr::load(src, i);
      float xc = x > m ? m : (x < -m ? -m : x);  // NaN passes through both compares
      float v = xc * inv;
      bool nan = v != v;
      float r = (v + kRound) - kRound;
      int32_t q = static_cast<int32_t>(nan ? 0.f : r);
      codes[i] = static_cast<int8_t>(nan ? static_cast<int32_t>(kNaNCode) : q);
    }
  }
}

template <class Tr>
inline void dequant_blocks(const int8_t* codes, const float* scales, int64_t n, int64_t block,
                           int64_t b0, int64_t b1, void* vdst) {
  auto* dst = static_cast<typename Tr::T*>(vdst);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = b * block, hi = lo + block < n ? lo + block : n;
    const float s = scales[b];
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      int8_t q = codes[i];
      float v = static_cast<float>(q) * s;
      Tr::store(dst, i, q == kNaNCode ? nan : v);
    }
  }
}

using QuantFn = void (*)(const void*, int64_t, int64_t, int64_t, int64_t, int8_t*, float*);
using DequantFn = void (*)(const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t, void*);

#define FD_VARIANTS(TR)                                                                        \
  __attribute__((target("avx2,f16c,fma"))) void quant_avx2_##TR(                               \
      const void* s, int64_t n, int64_t bl, int64_t b0, int64_t b1, int8_t* c, float* sc) {    \
    quant_blocks<TR>(s, n, bl, b0, b1, c, sc);                                                 \
  }                                                                                            \
  void quant_base_##TR(const void* s, int64_t n, int64_t bl, int64_t b0, int64_t b1,           \
                       int8_t* c, float* sc) {                                                 \
    quant_blocks<TR>(s, n, bl, b0, b1, c, sc);                                                 \
  }                                                                                            \
  __attribute__((target("avx2,f16c,fma"))) void dequant_avx2_##TR(                             \
      const int8_t* c, const float* sc, int64_t n, int64_t bl, int64_t b0, int64_t b1,         \
      void* d) {                                                                               \
    dequant_blocks<TR>(c, sc, n, bl, b0, b1, d);                                               \
  }                                                                                            \
  void dequant_base_##TR(const int8_t* c, const float* sc, int64_t n, int64_t bl, int64_t b0,  \
                         int64_t b1, void* d) {                                                \
    dequant_blocks<TR>(c, sc, n, bl, b0, b1, d);                                               \
  }
FD_VARIANTS(F32)
FD_VARIANTS(BF16)
FD_VARIANTS(F16)
#undef FD_VARIANTS

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                         __builtin_cpu_supports("fma");
  return ok;
}

// Runs fn over [0, nblocks) in contiguous chunks, one per thread when the tensor is big.
template <class Fn>
void over_blocks(int64_t n, int64_t block, int threads, Fn fn) {
  const int64_t nblocks = (n + block - 1) / block;
  int nt = threads > 0 ? threads : openmp_threads();
  if (n < kParallelMin || nt <= 1) {
    fn(0, nblocks);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    const int64_t per = (nblocks + nt - 1) / nt;
    const int64_t b0 = t * per, b1 = b0 + per < nblocks ? b0 + per : nblocks;
    if (b0 < b1) fn(b0, b1);
  }
}

}  // namespace

void quantize_int8(const void* src, uint8_t dtype, int64_t n, int64_t block, int8_t* codes,
                   float* scales, int threads) {
  check_codec_args(dtype, n, block);
  const bool v = has_avx2();
  QuantFn fn = dtype == kF32    ? (v ? quant_avx2_F32 : quant_base_F32)
               : dtype == kBF16 ? (v ? quant_avx2_BF16 : quant_base_BF16)
                                : (v ? quant_avx2_F16 : quant_base_F16);
  over_blocks(n, block, threads,
              [&](int64_t b0, int64_t b1) { fn(src, n, block, b0, b1, codes, scales); });
}

void dequantize_int8(const int8_t* codes, const float* scales, int64_t n, int64_t block,
                     void* dst, uint8_t dtype, int threads) {
  check_codec_args(dtype, n, block);
  const bool v = has_avx2();
  DequantFn fn = dtype == kF32    ? (v ? dequant_avx2_F32 : dequant_base_F32)
                 : dtype == kBF16 ? (v ? dequant_avx2_BF16 : dequant_base_BF16)
                                  : (v ? dequant_avx2_F16 : dequant_base_F16);
  over_blocks(n, block, threads,
              [&](int64_t b0, int64_t b1) { fn(codes, scales, n, block, b0, b1, dst); });
}

}  // namespace quant
}  // namespace fastdume
