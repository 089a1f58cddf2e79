"""Wire messages: CRC32C, the header layout, pack/unpack, damaged and mismatched messages, the
buffer pool, and the constants shared by Python and both extensions."""

import struct

import pytest
import torch

from fastdume.ops import quant, wire


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_bitwise_reference():
    assert _crc32c_bitwise(b"123456789") == 0xE3069283
    for n in (0, 1, 7, 8, 9, 1001):
        t = torch.randint(0, 256, (n,), dtype=torch.uint8)
        assert wire.checksum(t) == _crc32c_bitwise(bytes(t.tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_pack_unpack_none_is_exact(dtype):
    x = (torch.randn(3, 5, 7) * 100).to(dtype)
    header, payload = wire.pack(x, step=4, micro_batch=1, stage=2)
    y = wire.unpack(header, payload, stage=2, micro_batch=1, step=4, shape=x.shape, dtype=dtype)
    assert y.dtype == dtype and torch.equal(y, x)


def test_pack_unpack_int8_matches_codec():
    x = torch.randn(2, 9, 33, dtype=torch.bfloat16)
    header, payload = wire.pack(x, step=1, micro_batch=0, stage=0, compress="int8", block=32)
    assert payload.numel() < x.numel() * 2
    y = wire.unpack(header, payload, stage=0, micro_batch=0, step=1, shape=x.shape)
    ref = quant.dequantize_reference(*quant.quantize_reference(x, 32), x.shape, x.dtype, 32)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_corrupt_payload_names_stage_and_micro_batch():
    x = torch.randn(4, 8)
    header, payload = wire.pack(x, step=3, micro_batch=5, stage=1, compress="int8", block=8)
    payload[7] ^= 0x10
    with pytest.raises(wire.StreamError, match=r"stage 1 micro-batch 5.*checksum"):
        wire.unpack(header, payload, where=wire.who(1, 5, 3))


def test_corrupt_header_is_caught():
    x = torch.randn(4, 8)
    header, payload = wire.pack(x, step=3, micro_batch=5, stage=1)
    header[40] ^= 0x01
    with pytest.raises(wire.StreamError, match=r"stage 1 micro-batch 5.*header checksum"):
        wire.unpack(header, payload, where=wire.who(1, 5))


@pytest.mark.parametrize(
    "key,value",
    [("shape", (4, 9)), ("dtype", torch.bfloat16), ("step", 2), ("micro_batch", 4), ("stage", 0)],
)
def test_mismatched_message_raises(key, value):
    x = torch.randn(4, 8)
    header, payload = wire.pack(x, step=3, micro_batch=5, stage=1)
    with pytest.raises(wire.StreamError, match=rf"stage 1 micro-batch 5.*{key} expected"):
        wire.unpack(header, payload, where=wire.who(1, 5), **{key: value})


def test_bad_pack_arguments_name_themselves():
    with pytest.raises(ValueError, match="compress must be one of"):
        wire.pack(torch.randn(3), step=0, micro_batch=0, stage=0, compress="int4")


def test_buffer_pool_reuses_and_bounds():
    from fastdume._C import BufferPool

    pool = BufferPool(2)
    i, a = pool.acquire(1000)
    assert a.shape == (1000,) and a.ctypes.data % 64 == 0
    pool.release(i)
    j, b = pool.acquire(800)  # fits the freed buffer
    assert j == i and pool.allocations == 1 and pool.reuses == 1
    k, _ = pool.acquire(10)
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.acquire(10)
    pool.release(k)
    pool.release(j)
    with pytest.raises(ValueError, match="not in use"):
        pool.release(j)


def test_pack_into_caller_buffer_matches():
    x = torch.randn(3, 50)
    h, p = wire.pack(x, step=2, micro_batch=1, stage=0, compress="int8", block=16)
    need = wire.payload_nbytes(x, "int8", 16)
    buf = torch.full((need + 10,), 0xAB, dtype=torch.uint8)
    h2, p2 = wire.pack(x, step=2, micro_batch=1, stage=0, compress="int8", block=16, out=buf)
    assert p2.data_ptr() == buf.data_ptr() and torch.equal(p2, p) and torch.equal(h2, h)
    with pytest.raises(ValueError, match=f"out must be a CPU uint8 buffer of >= {need} bytes"):
        wire.pack(x, step=2, micro_batch=1, stage=0, compress="int8", block=16, out=buf[:10])


@pytest.mark.gpu
def test_pack_unpack_cuda_int8_matches_cpu():
    x = torch.randn(4, 33, 65, device="cuda", dtype=torch.bfloat16)
    header, payload = wire.pack(x, step=0, micro_batch=1, stage=0, compress="int8", block=64)
    y = wire.unpack(header, payload, device="cuda")
    ref = quant.dequantize_reference(*quant.quantize_reference(x.cpu(), 64), x.shape, x.dtype, 64)
    assert y.is_cuda
    torch.testing.assert_close(y.cpu(), ref, rtol=0, atol=0)


def test_constants_agree_with_both_extensions():
    from fastdume.ops._ext import cpu_ext, cuda_ext

    exts = [e for e in (cpu_ext(), cuda_ext()) if e is not None]
    assert cpu_ext() in exts  # the C++ module is always built
    names = {str(d).removeprefix("torch."): code for d, code in quant.DTYPE_CODES.items()}
    for ext in exts:
        assert ext.HEADER_BYTES == wire.HEADER_BYTES
        assert ext.NAN_CODE == quant.NAN_CODE and ext.DEFAULT_BLOCK == quant.DEFAULT_BLOCK
        assert ext.DTYPE_CODES == names and ext.CODEC_CODES == wire.CODEC_CODES
        assert ext.MAGIC.to_bytes(4, "little") == b"FDSM" and ext.WIRE_VERSION == 1


def test_header_layout_matches_struct_reference():
    # the C++ struct, rebuilt with Python's struct module: natural alignment, little-endian
    x = torch.randn(2, 3, 45, dtype=torch.float16)
    header, payload = wire.pack(
        x, step=2**40 + 3, micro_batch=7, stage=5, compress="int8", block=64
    )
    fields = struct.pack(
        "<IHBBB3xIiiq8qQI",
        int.from_bytes(b"FDSM", "little"),
        1,
        quant.DTYPE_CODES[torch.float16],
        wire.CODEC_CODES["int8"],
        3,
        64,
        5,
        7,
        2**40 + 3,
        *(2, 3, 45, 0, 0, 0, 0, 0),
        payload.numel(),
        _crc32c_bitwise(bytes(payload.tolist())),
    )
    want = fields + struct.pack("<I", _crc32c_bitwise(fields))
    want += bytes(wire.HEADER_BYTES - len(want))
    assert bytes(header.tolist()) == want
    assert payload.numel() == 4 * 5 + 270  # ceil(270 / 64) scales, then the codes


def test_public_buffer_pool_hands_out_reusable_tensors():
    pool = wire.BufferPool(2)
    i, a = pool.acquire(1000)
    assert isinstance(a, torch.Tensor) and a.dtype == torch.uint8 and a.shape == (1000,)
    assert a.data_ptr() % 64 == 0
    a.fill_(7)
    pool.release(i)
    j, b = pool.acquire(900)
    assert j == i and b.data_ptr() == a.data_ptr() and pool.allocations == 1 and pool.reuses == 1
    assert len(pool) == 1
    pool.release(j)


@pytest.mark.parametrize("compress", ["none", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_staged_pack_and_decode_match_pack_and_unpack(compress, dtype):
    # the CUDA path's logic (encode, copy through pinned buffers, upload) with host fakes
    from _stager_fakes import fake_stager

    st = fake_stager()
    x = (torch.randn(3, 40, 17) * 50).to(dtype)
    want_h, want_p = wire.pack(x, step=4, micro_batch=2, stage=1, compress=compress, block=32)
    msg = wire.pack_device(x, st, step=4, micro_batch=2, stage=1, compress=compress, block=32)
    assert not msg.ready()  # the copy off the device has not run yet
    header, payload = msg.finish()
    assert torch.equal(header, want_h) and torch.equal(payload, want_p)
    info = wire.read_header(header, "stage 1")
    y = wire.decode(info, payload.clone(), where="stage 1", stager=st)
    assert torch.equal(y, wire.unpack(want_h, want_p))
    st.release(msg.buf_id)
    st.reset()
    assert st.pool.busy() == [] and st.held == []
