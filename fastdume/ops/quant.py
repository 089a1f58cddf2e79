"""The blockwise int8 codec of activation streaming: torch reference, C++ and CUDA backends.

One fp32 scale per block of `block` consecutive elements of the flattened tensor (the last block
may be short):
    m = max |x| over the block's finite elements (0 when m < 1e-36, so 127/m stays finite)
    scale = m / 127;  q = round_half_even(clamp(x, -m, m) * (127 / m)) in -127..127
    NaN -> code -128 -> NaN on decode; +-Inf saturate to +-m (0 if the block has no finite value).
    Decode: q * scale in fp32, rounded to the original dtype. |x - decode| <= scale / 2 (+ the
    rounding of the target dtype) for every finite x.
The wire payload of a message (fastdume/ops/wire.py) is the fp32 scales then the int8 codes.

Backends: "cpp" (fastdume._C, csrc/quant.cpp: OpenMP with torch.get_num_threads() threads, CPU
tensors), "cuda" (fastdume._C_cuda, csrc/cuda/quant.cu: CUDA tensors, queued on torch's current
stream), "torch" (the reference below, any device). None picks the fastest that applies. All
three produce the same bits. The constants mirror csrc/wire_format.h.
"""

import math

import torch

from fastdume.ops._ext import cpu_ext, cuda_ext, cuda_ext_ready

DEFAULT_BLOCK = 256
NAN_CODE = -128
_TINY = 1e-36
# Element-type codes of csrc/wire_format.h: the extensions take them, and the wire header
# carries them (the codec itself accepts the FLOAT_DTYPES).
DTYPE_CODES = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.int64: 3,
    torch.int32: 4,
    torch.uint8: 5,
}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _backend(backend, device):
    if backend is None:
        if device.type == "cuda" and cuda_ext_ready():
            return "cuda"
        if device.type == "cpu" and cpu_ext() is not None:
            return "cpp"
        return "torch"
    if backend not in ("torch", "cpp", "cuda"):
        raise ValueError(f"backend must be 'torch', 'cpp', 'cuda' or None, got {backend!r}")
    if backend == "cpp" and (device.type != "cpu" or cpu_ext() is None):
        raise RuntimeError(f"backend='cpp' needs CPU tensors and fastdume._C (device {device})")
    if backend == "cuda" and (device.type != "cuda" or not cuda_ext_ready()):
        raise RuntimeError(f"backend='cuda' needs CUDA tensors and fastdume._C_cuda ({device})")
    return backend


def _check_float(x, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}.dtype must be one of {FLOAT_DTYPES}, got {x.dtype}")


def check_block(block):
    """ValueError unless block (elements per scale) is a positive int."""
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")


def num_blocks(n, block):
    return (n + block - 1) // block


# ---- torch reference ----


def quantize_reference(x, block=DEFAULT_BLOCK):
    """Torch reference of the int8 codec: (codes int8 [n], scales fp32 [ceil(n/block)])."""
    a = x.reshape(-1).float()
    n, nb = a.numel(), num_blocks(a.numel(), block)
    a = torch.nn.functional.pad(a, (0, nb * block - n)).view(nb, block)
    finite = torch.where(torch.isfinite(a), a.abs(), torch.zeros_like(a))
    m = finite.amax(1, keepdim=True) if nb else a.new_zeros(0, 1)
    m = torch.where(m >= _TINY, m, torch.zeros_like(m))
    # 127 / m as a true fp32 division (python-scalar / tensor would multiply by a reciprocal)
    inv = torch.where(m > 0, torch.full_like(m, 127.0) / m, torch.zeros_like(m))
    v = torch.clamp(a, -m, m) * inv
    q = torch.where(torch.isnan(v), torch.full_like(v, NAN_CODE), torch.round(v))
    return q.to(torch.int8).reshape(-1)[:n].contiguous(), (m / 127.0).reshape(-1)


def dequantize_reference(codes, scales, shape, dtype, block=DEFAULT_BLOCK):
    """Torch reference of the int8 decoder."""
    n = codes.numel()
    nb = scales.numel()
    q = torch.nn.functional.pad(codes.reshape(-1).to(torch.float32), (0, nb * block - n))
    x = q.view(nb, block) * scales.view(nb, 1)
    x = torch.where(q.view(nb, block) == NAN_CODE, torch.full_like(x, float("nan")), x)
    return x.reshape(-1)[:n].to(dtype).reshape(shape)


# ---- public ops ----


def quantize(x, block=DEFAULT_BLOCK, backend=None, out=None):
    """Blockwise int8 codes and fp32 scales of `x` (any shape, flattened in C order).

    out: optional (codes, scales) tensors to write into (e.g. views of a wire buffer)."""
    _check_float(x)
    check_block(block)
    be = _backend(backend, x.device)
    if be == "torch":
        codes, scales = quantize_reference(x, block)
        if out is None:
            return codes, scales
        out[0].copy_(codes)
        out[1].copy_(scales)
        return out
    x = x.contiguous()
    n = x.numel()
    if out is None:
        codes = torch.empty(n, dtype=torch.int8, device=x.device)
        scales = torch.empty(num_blocks(n, block), dtype=torch.float32, device=x.device)
    else:
        codes, scales = out
        _check_out(codes, torch.int8, n, x.device, "codes")
        _check_out(scales, torch.float32, num_blocks(n, block), x.device, "scales")
    if be == "cpp":
        cpu_ext().quantize_int8(
            x.data_ptr(),
            DTYPE_CODES[x.dtype],
            n,
            block,
            codes.data_ptr(),
            scales.data_ptr(),
            torch.get_num_threads(),  # the same thread budget as torch's own CPU ops
        )
    else:
        stream = torch.cuda.current_stream(x.device).cuda_stream
        cuda_ext().quantize_int8(
            x.data_ptr(),
            DTYPE_CODES[x.dtype],
            n,
            block,
            codes.data_ptr(),
            scales.data_ptr(),
            stream,
        )
    return codes, scales


def dequantize(codes, scales, shape, dtype=torch.float32, block=DEFAULT_BLOCK, backend=None):
    """Inverse of `quantize`: a tensor of `shape` and `dtype`."""
    check_block(block)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    n = math.prod(shape)
    _check_out(codes, torch.int8, n, codes.device, "codes")
    _check_out(scales, torch.float32, num_blocks(n, block), codes.device, "scales")
    be = _backend(backend, codes.device)
    if be == "torch":
        return dequantize_reference(codes, scales, shape, dtype, block)
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    if be == "cpp":
        cpu_ext().dequantize_int8(
            codes.data_ptr(),
            scales.data_ptr(),
            n,
            block,
            out.data_ptr(),
            DTYPE_CODES[dtype],
            torch.get_num_threads(),
        )
    else:
        stream = torch.cuda.current_stream(codes.device).cuda_stream
        cuda_ext().dequantize_int8(
            codes.data_ptr(),
            scales.data_ptr(),
            n,
            block,
            out.data_ptr(),
            DTYPE_CODES[dtype],
            stream,
        )
    return out


def _check_out(t, dtype, numel, device, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype or t.numel() != numel or t.device != device or not t.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of {numel} elements on {device}, got "
            f"{t.dtype} with {t.numel()} elements on {t.device}"
        )
