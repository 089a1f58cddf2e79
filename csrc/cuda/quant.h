// The blockwise int8 codec on the device: the same bits as csrc/quant.cpp. Tensors arrive as
// data pointers and streams as cudaStream_t handles (uintptr), e.g.
// torch.cuda.current_stream().cuda_stream; the work is queued on that stream.
#pragma once
#include <cstdint>

namespace fastdume {
namespace cuda {

void quantize_int8(uintptr_t src, uint8_t dtype, int64_t n, int64_t block, uintptr_t codes,
                   uintptr_t scales, uintptr_t stream);
void dequantize_int8(uintptr_t codes, uintptr_t scales, int64_t n, int64_t block, uintptr_t dst,
                     uint8_t dtype, uintptr_t stream);

}  // namespace cuda
}  // namespace fastdume
