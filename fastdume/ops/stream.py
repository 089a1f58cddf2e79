"""Activation streaming: blockwise int8 compression and checked wire messages.

A message is a fixed 128-byte header followed by a payload. The header carries dtype, codec,
shape, block size, step, micro-batch, sending stage, payload size and a CRC32C of the payload
(and of itself), so the receiver can refuse a wrong, stale or damaged message with an error that
names the stage and micro-batch, instead of training on it.

int8 codec (one fp32 scale per block of `block` consecutive elements of the flattened tensor;
the last block may be short):
    m = max |x| over the block's finite elements (0 when m < 1e-36, so 127/m stays finite)
    scale = m / 127;  q = round_half_even(clamp(x, -m, m) * (127 / m)) in -127..127
    NaN -> code -128 -> NaN on decode; +-Inf saturate to +-m (0 if the block has no finite value).
    Decode: q * scale in fp32, rounded to the original dtype. |x - decode| <= scale / 2 (+ the
    rounding of the target dtype) for every finite x.
Payload layout for int8: fp32 scales [ceil(n / block)] then int8 codes [n].

Backends: "cpp" (fastdume._C, OpenMP with torch.get_num_threads() threads, CPU tensors),
"cuda" (fastdume._C_cuda, CUDA tensors), "torch" (the reference, any device). None picks the
fastest that applies.
"""

import math

import torch

from fastdume.ops._ext import cpu_ext, cuda_ext, cuda_ext_ready

COMPRESSIONS = ("none", "int8")
DEFAULT_BLOCK = 256
HEADER_BYTES = 128
NAN_CODE = -128
_TINY = 1e-36
DTYPE_CODES = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.int64: 3,
    torch.int32: 4,
    torch.uint8: 5,
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CODEC_CODES = {"none": 0, "int8": 1}


class StreamError(ValueError):
    """A received message does not match what the receiver expects, or is damaged."""


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


def _check_block(block):
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
    _check_block(block)
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
    _check_block(block)
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


def checksum(t):
    """CRC32C of a contiguous CPU tensor's bytes."""
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    ext = cpu_ext()
    if ext is None:
        raise RuntimeError("checksum needs fastdume._C (the C++ extension is not built)")
    return ext.crc32c(t.data_ptr(), nbytes, 0)


def _bytes_view(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def payload_nbytes(x, compress="none", block=DEFAULT_BLOCK):
    """Bytes of the payload `pack` produces for x (to size a reusable send buffer)."""
    if compress == "int8" and x.dtype in FLOAT_DTYPES:
        return 4 * num_blocks(x.numel(), block) + x.numel()
    return x.numel() * x.element_size()


def pack(x, *, step, micro_batch, stage, compress="none", block=DEFAULT_BLOCK, out=None):
    """Encode `x` as (header uint8 [128], payload uint8 [nbytes]) CPU tensors for the wire.

    out: optional uint8 CPU buffer of at least payload_nbytes(x, ...) bytes for an int8 payload
    (e.g. from a BufferPool); an uncompressed CPU payload is a view of x and needs none."""
    if compress not in CODEC_CODES:
        raise ValueError(f"compress must be one of {COMPRESSIONS}, got {compress!r}")
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"x.dtype must be one of {tuple(DTYPE_CODES)}, got {x.dtype}")
    if compress == "int8" and x.dtype not in FLOAT_DTYPES:
        compress = "none"  # token ids and masks travel exact
    ext = cpu_ext()
    n = x.numel()
    if compress == "none":
        payload = _bytes_view(x.detach().cpu())
    else:
        _check_block(block)
        nb = num_blocks(n, block)
        if out is None:
            payload = torch.empty(4 * nb + n, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or out.numel() < 4 * nb + n or out.device.type != "cpu":
            raise ValueError(
                f"out must be a CPU uint8 buffer of >= {4 * nb + n} bytes, got {out.dtype} "
                f"[{out.numel()}] on {out.device}"
            )
        else:
            payload = out[: 4 * nb + n]
        scales = payload[: 4 * nb].view(torch.float32)
        codes = payload[4 * nb :].view(torch.int8)
        if x.is_cuda:
            c, s = quantize(x.detach(), block)
            codes.copy_(c)
            scales.copy_(s)
        else:
            quantize(x.detach(), block, out=(codes, scales))
    header = ext.header_bytes(
        DTYPE_CODES[x.dtype],
        CODEC_CODES[compress],
        list(x.shape),
        block if compress == "int8" else 0,
        int(stage),
        int(micro_batch),
        int(step),
        payload.numel(),
        checksum(payload),
    )
    return torch.frombuffer(bytearray(header), dtype=torch.uint8), payload


def who(stage, micro_batch, step=None):
    s = f"stage {stage} micro-batch {micro_batch}"
    return s if step is None else f"{s} (step {step})"


def read_header(header, where):
    """Parse a received header tensor; StreamError naming `where` if it is damaged."""
    if header.dtype != torch.uint8 or header.numel() != HEADER_BYTES:
        raise StreamError(
            f"message from {where}: header must be {HEADER_BYTES} uint8, got {header.numel()} "
            f"{header.dtype}"
        )
    header = header.contiguous()
    try:
        info = cpu_ext().parse_header(header.data_ptr(), where)
    except ValueError as exc:
        raise StreamError(str(exc)) from None
    info["dtype"] = CODE_DTYPES[info["dtype"]]
    info["compress"] = {v: k for k, v in CODEC_CODES.items()}[info["codec"]]
    info["shape"] = tuple(info["shape"])
    return info


def check_header(info, where, *, stage=None, micro_batch=None, step=None, shape=None, dtype=None):
    """Compare a parsed header with what the receiver expects; StreamError on any mismatch."""
    expected = {
        "stage": stage,
        "micro_batch": micro_batch,
        "step": step,
        "shape": None if shape is None else tuple(shape),
        "dtype": dtype,
    }
    for key, want in expected.items():
        if want is not None and info[key] != want:
            raise StreamError(
                f"mismatched message for {where}: {key} expected {want}, got {info[key]}"
            )


def unpack(header, payload, *, where="peer", device="cpu", **expect):
    """Validate and decode one message; returns the tensor in its original dtype and shape.

    expect: stage=, micro_batch=, step=, shape=, dtype= to check against the header."""
    info = read_header(header, where)
    check_header(info, where, **expect)
    if payload.numel() != info["payload_bytes"]:
        raise StreamError(
            f"message from {where}: payload has {payload.numel()} bytes, header says "
            f"{info['payload_bytes']}"
        )
    crc = checksum(payload)
    if crc != info["payload_crc"]:
        raise StreamError(
            f"corrupt message from {where}: payload checksum {crc:#010x} != header "
            f"{info['payload_crc']:#010x}"
        )
    shape, dtype = info["shape"], info["dtype"]
    if info["compress"] == "none":
        out = payload.view(dtype).reshape(shape).clone()
        return out.to(device) if device != "cpu" else out
    n, block = math.prod(shape), info["block"]
    nb = num_blocks(n, block)
    scales = payload[: 4 * nb].view(torch.float32)
    codes = payload[4 * nb :].view(torch.int8)
    if torch.device(device).type == "cuda":
        scales, codes = scales.to(device), codes.to(device)
    return dequantize(codes, scales, shape, dtype, block)


# ---- device <-> host staging (CUDA) ----


def _host_view(ptr, nbytes):
    import ctypes

    buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0)


class DeviceStager:
    """Device<->host copies through reusable pinned buffers on dedicated copy streams.

    A copy waits (on the GPU) for the work already queued on torch's current stream, and the
    compute stream waits (on the GPU) for an upload before using it, so neither the host nor
    compute blocks on a transfer; only `wait_host` blocks, when the bytes must hit the wire."""

    def __init__(self, max_buffers=8):
        self._uploads, self._sources = [], []
        if not cuda_ext_ready():
            reason = cuda_ext().device_query()["reason"] if cuda_ext() is not None else "not built"
            raise RuntimeError(f"DeviceStager needs fastdume._C_cuda and a device: {reason}")
        ext = cuda_ext()
        self.engine, self.pool = ext.CopyEngine(), ext.PinnedPool(max_buffers)

    def to_host(self, x):
        """Queue a D2H copy of CUDA tensor x; returns (buffer id, uint8 host view, event)."""
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        buf_id, ptr = self.pool.acquire(nbytes)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        event = self.engine.copy(ptr, x.data_ptr(), nbytes, True, stream)
        # x's memory must not be reused before the copy stream has read it: hold x until reset.
        # (Not x.record_stream: on an H200 with torch 2.11, freeing a tensor recorded on a copy
        # stream of fastdume's own CUDA runtime aborted the process.)
        self._sources.append(x)
        return buf_id, _host_view(ptr, nbytes), event

    def to_device(self, host, shape, dtype, device):
        """Queue an H2D copy of a uint8 host tensor into a new CUDA tensor; torch's current
        stream waits for it on the GPU. Returns (tensor, event)."""
        out = torch.empty(shape, dtype=dtype, device=device)
        nbytes = out.numel() * out.element_size()
        if host.numel() != nbytes:
            raise ValueError(
                f"host must hold {nbytes} bytes for {tuple(shape)} {dtype}, got {host.numel()}"
            )
        buf_id, ptr = self.pool.acquire(nbytes)
        _host_view(ptr, nbytes).copy_(host.reshape(-1))
        stream = torch.cuda.current_stream(device).cuda_stream
        event = self.engine.copy(out.data_ptr(), ptr, nbytes, False, stream)
        self.engine.stream_wait(event, stream)
        self._uploads.append((event, buf_id))
        return out, event

    def wait_host(self, event):
        self.engine.synchronize(event)

    def release(self, buf_id):
        self.pool.release(buf_id)

    def reset(self):
        """Wait for all copies, return upload buffers to the pool, free the copied tensors and
        recycle event ids. Call once per step."""
        self.engine.reset()
        for _, buf_id in self._uploads:
            self.pool.release(buf_id)
        self._uploads, self._sources = [], []
