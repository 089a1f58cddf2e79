// The blockwise int8 codec on the host (OpenMP, AVX2 dispatch). Plain pointers and sizes only
// (no torch): Python passes data_ptr()s and owns the memory. Codes and constants: wire_format.h.
#pragma once
#include <cstdint>

#include "wire_format.h"

namespace fastdume {
namespace quant {

// One scale per block of `block` consecutive elements (the last block may be short).
// scale = max|x| over the finite x of the block / 127; q = round_half_even(clamp(x) * 127/max);
// NaN -> kNaNCode; +-Inf saturate to +-max of the block's finite values (0 when it has none).
// dtype: a wire::DType float code. threads: OpenMP threads to use (0 = the OpenMP default).
void quantize_int8(const void* src, uint8_t dtype, int64_t n, int64_t block, int8_t* codes,
                   float* scales, int threads = 0);
// x = q * scale in fp32, then rounded to `dtype` (round to nearest even); kNaNCode -> NaN.
void dequantize_int8(const int8_t* codes, const float* scales, int64_t n, int64_t block,
                     void* dst, uint8_t dtype, int threads = 0);

}  // namespace quant
}  // namespace fastdume
