"""Activation streaming: C++ (and CUDA) int8 codec vs the torch reference, wire messages."""

import numpy as np
import pytest
import torch

from fastdume.ops import stream

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _input(n, dtype, scale=3.0):
    # mixed magnitudes per block so the scales differ
    x = torch.randn(n) * scale * torch.exp(torch.randn(n).clamp(-3, 3))
    return x.to(dtype)


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,block", [(1, 256), (255, 256), (1000, 256), (1000, 33), (300_001, 128)])
def test_cpp_matches_reference_bitwise(n, block, dtype):
    x = _input(n, dtype)
    ref_codes, ref_scales = stream.quantize_reference(x, block)
    codes = torch.full((n,), 77, dtype=torch.int8)
    scales = torch.full((stream.num_blocks(n, block),), float("nan"))
    stream.quantize(x, block, backend="cpp", out=(codes, scales))
    torch.testing.assert_close(scales, ref_scales, rtol=0, atol=0)
    assert torch.equal(codes, ref_codes)
    out = stream.dequantize(codes, scales, x.shape, dtype, block, backend="cpp")
    ref = stream.dequantize_reference(ref_codes, ref_scales, x.shape, dtype, block)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_error_bound_per_block_float64(dtype):
    n, block = 5000, 64
    x = _input(n, dtype)
    y = stream.dequantize(*stream.quantize(x, block), x.shape, dtype, block)
    xd = x.double().numpy()
    pad = (-n) % block
    absmax = np.abs(np.pad(xd, (0, pad))).reshape(-1, block).max(1)
    bound = np.repeat(absmax / 254.0, block)[:n]
    # plus the rounding of the output dtype
    eps = {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    err = np.abs(y.double().numpy() - xd)
    assert np.all(err <= bound * (1 + 1e-5) + np.abs(xd) * eps + 1e-30)
    assert err.max() > 0  # it really is lossy


def test_nan_inf_handling():
    block = 8
    x = torch.randn(4 * block)
    x[1] = float("nan")
    x[2] = float("inf")
    x[3] = float("-inf")
    x[block : 2 * block] = float("inf")  # a block with no finite value
    x[2 * block + 5] = float("nan")
    finite_max0 = x[:block][torch.isfinite(x[:block])].abs().max()
    codes, scales = stream.quantize(x, block, backend="cpp")
    rc, rs = stream.quantize_reference(x, block)
    assert torch.equal(codes, rc) and torch.equal(scales, rs)
    assert codes[1] == stream.NAN_CODE and codes[2 * block + 5] == stream.NAN_CODE
    assert codes[2] == 127 and codes[3] == -127
    torch.testing.assert_close(scales[0], finite_max0 / 127, rtol=0, atol=0)
    assert scales[1] == 0 and torch.all(codes[block : 2 * block] == 0)
    y = stream.dequantize(codes, scales, x.shape, torch.float32, block, backend="cpp")
    assert torch.isnan(y[1]) and torch.isnan(y[2 * block + 5])
    assert torch.isclose(y[2], finite_max0) and torch.isclose(y[3], -finite_max0)
    assert torch.all(y[block : 2 * block] == 0)
    assert torch.isfinite(y).sum() == x.numel() - 2


def test_tiny_block_encodes_zero():
    x = torch.full((16,), 1e-38)
    codes, scales = stream.quantize(x, 16, backend="cpp")
    assert torch.all(codes == 0) and scales[0] == 0


def test_crc32c_matches_bitwise_reference():
    assert _crc32c_bitwise(b"123456789") == 0xE3069283
    for n in (0, 1, 7, 8, 9, 1001):
        t = torch.randint(0, 256, (n,), dtype=torch.uint8)
        assert stream.checksum(t) == _crc32c_bitwise(bytes(t.tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_pack_unpack_none_is_exact(dtype):
    x = (torch.randn(3, 5, 7) * 100).to(dtype)
    header, payload = stream.pack(x, step=4, micro_batch=1, stage=2)
    y = stream.unpack(header, payload, stage=2, micro_batch=1, step=4, shape=x.shape, dtype=dtype)
    assert y.dtype == dtype and torch.equal(y, x)


def test_pack_unpack_int8_matches_codec():
    x = torch.randn(2, 9, 33, dtype=torch.bfloat16)
    header, payload = stream.pack(x, step=1, micro_batch=0, stage=0, compress="int8", block=32)
    assert payload.numel() < x.numel() * 2
    y = stream.unpack(header, payload, stage=0, micro_batch=0, step=1, shape=x.shape)
    ref = stream.dequantize_reference(*stream.quantize_reference(x, 32), x.shape, x.dtype, 32)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_corrupt_payload_names_stage_and_micro_batch():
    x = torch.randn(4, 8)
    header, payload = stream.pack(x, step=3, micro_batch=5, stage=1, compress="int8", block=8)
    payload[7] ^= 0x10
    with pytest.raises(stream.StreamError, match=r"stage 1 micro-batch 5.*checksum"):
        stream.unpack(header, payload, where=stream.who(1, 5, 3))


def test_corrupt_header_is_caught():
    x = torch.randn(4, 8)
    header, payload = stream.pack(x, step=3, micro_batch=5, stage=1)
    header[40] ^= 0x01
    with pytest.raises(stream.StreamError, match=r"stage 1 micro-batch 5.*header checksum"):
        stream.unpack(header, payload, where=stream.who(1, 5))


@pytest.mark.parametrize(
    "key,value",
    [("shape", (4, 9)), ("dtype", torch.bfloat16), ("step", 2), ("micro_batch", 4), ("stage", 0)],
)
def test_mismatched_message_raises(key, value):
    x = torch.randn(4, 8)
    header, payload = stream.pack(x, step=3, micro_batch=5, stage=1)
    with pytest.raises(stream.StreamError, match=rf"stage 1 micro-batch 5.*{key} expected"):
        stream.unpack(header, payload, where=stream.who(1, 5), **{key: value})


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="block must be a positive int, got 0"):
        stream.quantize(torch.randn(4), 0)
    with pytest.raises(ValueError, match="x.dtype"):
        stream.quantize(torch.arange(4), 2)
    with pytest.raises(ValueError, match="compress must be one of"):
        stream.pack(torch.randn(3), step=0, micro_batch=0, stage=0, compress="int4")
    with pytest.raises(ValueError, match="codes must be a contiguous torch.int8 tensor of 4"):
        stream.dequantize(torch.zeros(3, dtype=torch.int8), torch.ones(1), (4,))


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,block", [(1000, 256), (1000, 33), (3_000_001, 128)])
def test_cuda_matches_reference_bitwise(n, block, dtype):
    x = _input(n, dtype).cuda()
    x[3] = float("nan")
    x[7] = float("inf")
    codes, scales = stream.quantize(x, block, backend="cuda")
    rc, rs = stream.quantize_reference(x.cpu(), block)
    assert torch.equal(codes.cpu(), rc)
    torch.testing.assert_close(scales.cpu(), rs, rtol=0, atol=0)
    y = stream.dequantize(codes, scales, x.shape, dtype, block, backend="cuda")
    ref = stream.dequantize_reference(rc, rs, x.shape, dtype, block)
    torch.testing.assert_close(y.cpu(), ref, rtol=0, atol=0, equal_nan=True)


def test_cuda_module_reports_no_device_instead_of_crashing():
    from fastdume.ops._ext import cuda_ext

    ext = cuda_ext()
    if ext is None:
        pytest.skip("fastdume._C_cuda not built (no nvcc at install time)")
    if torch.cuda.is_available():
        pytest.skip("a device is present")
    info = ext.device_query()
    assert info["available"] is False and info["reason"].startswith("no device")
    for call in (
        lambda: ext.quantize_int8(0, 0, 16, 8, 0, 0, 0),
        lambda: ext.CopyEngine(),
        lambda: ext.PinnedPool(2),
    ):
        with pytest.raises(RuntimeError, match="no device"):
            call()
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        stream.quantize(torch.randn(8), 8, backend="cuda")
    with pytest.raises(RuntimeError, match="DeviceStager needs fastdume._C_cuda and a device"):
        stream.DeviceStager()


@pytest.mark.gpu
def test_device_stager_orders_copies_after_compute():
    stager = stream.DeviceStager()
    x = torch.randn(1 << 20, device="cuda")
    for _ in range(3):
        y = x * 2 + 1  # queued on the compute stream; the copy must see its result
        buf, host, ev = stager.to_host(y)
        stager.wait_host(ev)
        torch.testing.assert_close(host.view(torch.float32), (x * 2 + 1).cpu(), rtol=0, atol=0)
        up, _ = stager.to_device(host, y.shape, torch.float32, "cuda")
        z = up - 1  # compute waits for the upload on the GPU
        torch.testing.assert_close(z, y - 1, rtol=0, atol=0)
        stager.release(buf)
        stager.reset()
    assert len(stager.pool) <= 2  # pinned buffers were reused


@pytest.mark.gpu
def test_pack_unpack_cuda_int8_matches_cpu():
    x = torch.randn(4, 33, 65, device="cuda", dtype=torch.bfloat16)
    header, payload = stream.pack(x, step=0, micro_batch=1, stage=0, compress="int8", block=64)
    y = stream.unpack(header, payload, device="cuda")
    ref = stream.dequantize_reference(*stream.quantize_reference(x.cpu(), 64), x.shape, x.dtype, 64)
    assert y.is_cuda
    torch.testing.assert_close(y.cpu(), ref, rtol=0, atol=0)


def test_pack_into_caller_buffer_matches():
    x = torch.randn(3, 50)
    h, p = stream.pack(x, step=2, micro_batch=1, stage=0, compress="int8", block=16)
    need = stream.payload_nbytes(x, "int8", 16)
    buf = torch.full((need + 10,), 0xAB, dtype=torch.uint8)
    h2, p2 = stream.pack(x, step=2, micro_batch=1, stage=0, compress="int8", block=16, out=buf)
    assert p2.data_ptr() == buf.data_ptr() and torch.equal(p2, p) and torch.equal(h2, h)
    with pytest.raises(ValueError, match=f"out must be a CPU uint8 buffer of >= {need} bytes"):
        stream.pack(x, step=2, micro_batch=1, stage=0, compress="int8", block=16, out=buf[:10])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversions_exact_for_every_bit_pattern(dtype):
    # block 1: each scale is |x| / 127 of one element, so it exposes the loaded value exactly
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    codes, scales = stream.quantize(x, 1, backend="cpp")
    rc, rs = stream.quantize_reference(x, 1)
    assert torch.equal(codes, rc) and torch.equal(scales, rs)
    # code 1 with scale v decodes to exactly v, rounded to dtype: the store conversion
    v = torch.cat([
        torch.tensor([float("nan"), float("inf"), -float("inf"), 65520.0, 65519.99, 3.4e38,
                      -0.0, 1e-8, 2.98e-8, 2.9802322e-8, 5.96e-8, 6.1e-5, 6.1035156e-05]),
        torch.randn(20000) * 2.0 ** torch.randint(-30, 17, (20000,)).float(),
    ])  # fmt: skip
    ones = torch.ones(v.numel(), dtype=torch.int8)
    out = stream.dequantize(ones, v, v.shape, dtype, 1, backend="cpp")
    ref = v.to(dtype)
    same = out.view(torch.int16) == ref.view(torch.int16)
    assert torch.all(same | (torch.isnan(out) & torch.isnan(ref)))
