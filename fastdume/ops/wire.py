"""Checked wire messages: the format of every tensor that travels between pipeline stages.

A message is a fixed 128-byte header followed by a payload. The header carries dtype, codec,
shape, block size, step, micro-batch, sending stage, payload size and a CRC32C of the payload
(and of itself), so the receiver can refuse a wrong, stale or damaged message with an error that
names the stage and micro-batch, instead of training on it. The layout is csrc/wire_format.h;
the C++ extension (csrc/wire.cpp) writes, parses and checksums it.

Payload: the tensor's bytes ("none"), or for "int8" (float tensors only; token ids and masks
travel exact) the fp32 scales [ceil(n / block)] then the int8 codes [n] of fastdume.ops.quant.

Sending: `pack` (host tensors; a CUDA tensor is staged through pinned memory, never copied
synchronously), or `pack_device` + `DevicePack.finish` to let the copy off the device run while
the caller does other work. Receiving: `read_header` + `check_header` as soon as the header
arrives, then `decode` the payload (or `unpack` both at once). Each header is parsed once.
"""

import functools
import math
import threading

import torch

from fastdume.ops._ext import cpu_ext
from fastdume.ops.quant import (
    DEFAULT_BLOCK,
    DTYPE_CODES,
    FLOAT_DTYPES,
    check_block,
    dequantize,
    num_blocks,
    quantize,
)
from fastdume.ops.stager import DeviceStager, stager_available

COMPRESSIONS = ("none", "int8")
HEADER_BYTES = 128
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
CODEC_CODES = {"none": 0, "int8": 1}
_CODEC_NAMES = {v: k for k, v in CODEC_CODES.items()}


class StreamError(ValueError):
    """A received message does not match what the receiver expects, or is damaged."""


def _ext():
    ext = cpu_ext()
    if ext is None:
        raise RuntimeError("wire messages need fastdume._C (the C++ extension is not built)")
    return ext


def checksum(t):
    """CRC32C of a contiguous CPU tensor's bytes."""
    t = t.contiguous()
    return _ext().crc32c(t.data_ptr(), t.numel() * t.element_size(), 0)


class BufferPool:
    """Reusable 64-byte aligned host buffers to build and receive messages in (csrc/wire.cpp).

    acquire(nbytes) -> (id, uint8 CPU tensor of nbytes), valid until release(id); a buffer is
    allocated once per size and handed out again after release."""

    def __init__(self, max_buffers=8):
        self._pool = _ext().BufferPool(max_buffers)

    def acquire(self, nbytes):
        buf_id, arr = self._pool.acquire(nbytes)
        return buf_id, torch.from_numpy(arr)  # the array keeps the pool alive

    def release(self, buf_id):
        self._pool.release(buf_id)

    @property
    def allocations(self):
        return self._pool.allocations

    @property
    def reuses(self):
        return self._pool.reuses

    def __len__(self):
        return len(self._pool)


def _codec_of(x, compress):
    if compress not in CODEC_CODES:
        raise ValueError(f"compress must be one of {COMPRESSIONS}, got {compress!r}")
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"x.dtype must be one of {tuple(DTYPE_CODES)}, got {x.dtype}")
    return "none" if x.dtype not in FLOAT_DTYPES else compress  # token ids travel exact


def payload_nbytes(x, compress="none", block=DEFAULT_BLOCK):
    """Bytes of the payload `pack` produces for x (to size a reusable send buffer)."""
    if compress == "int8" and x.dtype in FLOAT_DTYPES:
        return 4 * num_blocks(x.numel(), block) + x.numel()
    return x.numel() * x.element_size()


def _header(dtype, shape, compress, block, stage, micro_batch, step, payload):
    header = _ext().header_bytes(
        DTYPE_CODES[dtype],
        CODEC_CODES[compress],
        list(shape),
        block if compress == "int8" else 0,
        int(stage),
        int(micro_batch),
        int(step),
        payload.numel(),
        checksum(payload),
    )
    return torch.frombuffer(bytearray(header), dtype=torch.uint8)


def pack(x, *, step, micro_batch, stage, compress="none", block=DEFAULT_BLOCK, out=None):
    """Encode `x` as (header uint8 [128], payload uint8 [nbytes]) CPU tensors for the wire.

    out: optional uint8 CPU buffer of at least payload_nbytes(x, ...) bytes for an int8 payload
    (e.g. from a BufferPool); an uncompressed CPU payload is a view of x and needs none.
    A CUDA x is encoded on the device and copied through pinned memory on a copy stream (a
    stager shared by the process); the payload is then the caller's own CPU tensor."""
    compress = _codec_of(x, compress)
    x = x.detach()
    n = x.numel()
    if compress == "int8":
        check_block(block)
        if out is not None and (
            out.dtype != torch.uint8
            or out.numel() < 4 * num_blocks(n, block) + n
            or out.device.type != "cpu"
        ):
            raise ValueError(
                f"out must be a CPU uint8 buffer of >= {4 * num_blocks(n, block) + n} bytes, got "
                f"{out.dtype} [{out.numel()}] on {out.device}"
            )
    if x.is_cuda and stager_available():
        return _pack_through_shared_stager(x, step, micro_batch, stage, compress, block, out)
    if compress == "none":
        payload = x.cpu().contiguous().reshape(-1).view(torch.uint8)
    else:
        nb = num_blocks(n, block)
        payload = torch.empty(4 * nb + n, dtype=torch.uint8) if out is None else out[: 4 * nb + n]
        scales = payload[: 4 * nb].view(torch.float32)
        codes = payload[4 * nb :].view(torch.int8)
        if x.is_cuda:  # no CUDA extension: the torch codec on the device, then plain copies
            c, s = quantize(x, block)
            codes.copy_(c)
            scales.copy_(s)
        else:
            quantize(x, block, out=(codes, scales))
    header = _header(x.dtype, x.shape, compress, block, stage, micro_batch, step, payload)
    return header, payload


# ---- CUDA tensors: encode on the device, copy through pinned memory ----


class DevicePack:
    """A message whose payload is being copied off the device (made by `pack_device`)."""

    def __init__(self, x, compress, block, stage, micro_batch, step, stager):
        self.meta = (compress, block, stage, micro_batch, step)
        self.shape, self.dtype = tuple(x.shape), x.dtype
        self.stager = stager
        self.buf_id, self.host, self.event = stager.to_host(_device_payload(x, compress, block))

    def ready(self):
        """True once the payload has reached host memory (does not block)."""
        return self.stager.done(self.event)

    def finish(self):
        """Wait for this copy alone, then checksum it: (header, payload). The payload is the
        stager's pinned buffer, valid until `stager.release(self.buf_id)`."""
        self.stager.wait_host(self.event)
        compress, block, stage, micro_batch, step = self.meta
        header = _header(
            self.dtype, self.shape, compress, block, stage, micro_batch, step, self.host
        )
        return header, self.host


def pack_device(x, stager, *, step, micro_batch, stage, compress="none", block=DEFAULT_BLOCK):
    """Start packing CUDA tensor x without blocking the host: encode it on the device (int8 on
    torch's current stream), queue one copy of the payload into a pinned buffer of `stager`.
    Returns a DevicePack; its finish() gives (header, payload)."""
    compress = _codec_of(x, compress)
    if compress == "int8":
        check_block(block)
    return DevicePack(x.detach(), compress, block, stage, micro_batch, step, stager)


def _device_payload(x, compress, block):
    if compress == "none":
        return x.contiguous().reshape(-1).view(torch.uint8)
    n = x.numel()
    nb = num_blocks(n, block)
    payload = torch.empty(4 * nb + n, dtype=torch.uint8, device=x.device)
    quantize(
        x, block, out=(payload[4 * nb :].view(torch.int8), payload[: 4 * nb].view(torch.float32))
    )
    return payload


_SHARED_LOCK = threading.Lock()


@functools.cache
def _shared_stager(device):
    return DeviceStager(device=device)


def _pack_through_shared_stager(x, step, micro_batch, stage, compress, block, out):
    with _SHARED_LOCK:
        stager = _shared_stager(x.device)
        msg = DevicePack(x, compress, block, stage, micro_batch, step, stager)
        try:
            header, pinned = msg.finish()
            if out is None or compress == "none":
                payload = pinned.clone()
            else:
                payload = out[: pinned.numel()].copy_(pinned)
        finally:
            stager.reset()
    return header, payload


# ---- receiving ----


def who(stage, micro_batch, step=None):
    s = f"stage {stage} micro-batch {micro_batch}"
    return s if step is None else f"{s} (step {step})"


def read_header(header, where):
    """Parse a received header tensor (magic, version, header CRC, consistency) once; returns a
    dict; StreamError naming `where` if it is damaged."""
    if header.dtype != torch.uint8 or header.numel() != HEADER_BYTES:
        raise StreamError(
            f"message from {where}: header must be {HEADER_BYTES} uint8, got {header.numel()} "
            f"{header.dtype}"
        )
    header = header.contiguous()
    try:
        info = _ext().parse_header(header.data_ptr(), where)
    except ValueError as exc:
        raise StreamError(str(exc)) from None
    info["dtype"] = CODE_DTYPES[info["dtype"]]
    info["compress"] = _CODEC_NAMES[info["codec"]]
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


def decode(info, payload, *, where="peer", device="cpu", stager=None):
    """Check a payload against its parsed header (size, CRC32C) and decode it: the tensor in its
    original dtype and shape on `device`. stager: a DeviceStager (for a CUDA device) to upload
    through pinned memory on a copy stream that torch's current stream waits for."""
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
    if stager is not None:
        return _decode_staged(info, payload, device, stager)
    shape, dtype = info["shape"], info["dtype"]
    on_cuda = torch.device(device).type == "cuda"
    if info["compress"] == "none":
        out = payload.view(dtype).reshape(shape).clone()
        return out.to(device) if device != "cpu" else out
    n, block = math.prod(shape), info["block"]
    nb = num_blocks(n, block)
    scales = payload[: 4 * nb].view(torch.float32)
    codes = payload[4 * nb :].view(torch.int8)
    if on_cuda:
        scales, codes = scales.to(device), codes.to(device)
    return dequantize(codes, scales, shape, dtype, block)


def _decode_staged(info, payload, device, stager):
    shape, dtype = info["shape"], info["dtype"]
    if info["compress"] == "none":
        return stager.to_device(payload, shape, dtype, device)[0]
    up, _ = stager.to_device(payload, (payload.numel(),), torch.uint8, device)
    n, block = math.prod(shape), info["block"]
    nb = num_blocks(n, block)
    codes, scales = up[4 * nb :].view(torch.int8), up[: 4 * nb].view(torch.float32)
    return dequantize(codes, scales, shape, dtype, block)


def unpack(header, payload, *, where="peer", device="cpu", stager=None, **expect):
    """Validate and decode one message; returns the tensor in its original dtype and shape.

    expect: stage=, micro_batch=, step=, shape=, dtype= to check against the header."""
    info = read_header(header, where)
    check_header(info, where, **expect)
    return decode(info, payload, where=where, device=device, stager=stager)
