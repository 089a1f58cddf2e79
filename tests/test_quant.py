"""The int8 codec: C++ (and CUDA) backends bit for bit against the torch reference, and its error
bound against float64."""

import numpy as np
import pytest
import torch

from fastdume.ops import quant

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _input(n, dtype, scale=3.0):
    # mixed magnitudes per block so the scales differ
    x = torch.randn(n) * scale * torch.exp(torch.randn(n).clamp(-3, 3))
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,block", [(1, 256), (255, 256), (1000, 256), (1000, 33), (300_001, 128)])
def test_cpp_matches_reference_bitwise(n, block, dtype):
    x = _input(n, dtype)
    ref_codes, ref_scales = quant.quantize_reference(x, block)
    codes = torch.full((n,), 77, dtype=torch.int8)
    scales = torch.full((quant.num_blocks(n, block),), float("nan"))
    quant.quantize(x, block, backend="cpp", out=(codes, scales))
    torch.testing.assert_close(scales, ref_scales, rtol=0, atol=0)
    assert torch.equal(codes, ref_codes)
    out = quant.dequantize(codes, scales, x.shape, dtype, block, backend="cpp")
    ref = quant.dequantize_reference(ref_codes, ref_scales, x.shape, dtype, block)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_error_bound_per_block_float64(dtype):
    n, block = 5000, 64
    x = _input(n, dtype)
    y = quant.dequantize(*quant.quantize(x, block), x.shape, dtype, block)
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
    codes, scales = quant.quantize(x, block, backend="cpp")
    rc, rs = quant.quantize_reference(x, block)
    assert torch.equal(codes, rc) and torch.equal(scales, rs)
    assert codes[1] == quant.NAN_CODE and codes[2 * block + 5] == quant.NAN_CODE
    assert codes[2] == 127 and codes[3] == -127
    torch.testing.assert_close(scales[0], finite_max0 / 127, rtol=0, atol=0)
    assert scales[1] == 0 and torch.all(codes[block : 2 * block] == 0)
    y = quant.dequantize(codes, scales, x.shape, torch.float32, block, backend="cpp")
    assert torch.isnan(y[1]) and torch.isnan(y[2 * block + 5])
    assert torch.isclose(y[2], finite_max0) and torch.isclose(y[3], -finite_max0)
    assert torch.all(y[block : 2 * block] == 0)
    assert torch.isfinite(y).sum() == x.numel() - 2


def test_tiny_block_encodes_zero():
    x = torch.full((16,), 1e-38)
    codes, scales = quant.quantize(x, 16, backend="cpp")
    assert torch.all(codes == 0) and scales[0] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversions_exact_for_every_bit_pattern(dtype):
    # block 1: each scale is |x| / 127 of one element, so it exposes the loaded value exactly
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    codes, scales = quant.quantize(x, 1, backend="cpp")
    rc, rs = quant.quantize_reference(x, 1)
    assert torch.equal(codes, rc) and torch.equal(scales, rs)
    # code 1 with scale v decodes to exactly v, rounded to dtype: the store conversion
    v = torch.cat([
        torch.tensor([float("nan"), float("inf"), -float("inf"), 65520.0, 65519.99, 3.4e38,
                      -0.0, 1e-8, 2.98e-8, 2.9802322e-8, 5.96e-8, 6.1e-5, 6.1035156e-05]),
        torch.randn(20000) * 2.0 ** torch.randint(-30, 17, (20000,)).float(),
    ])  # fmt: skip
    ones = torch.ones(v.numel(), dtype=torch.int8)
    out = quant.dequantize(ones, v, v.shape, dtype, 1, backend="cpp")
    ref = v.to(dtype)
    same = out.view(torch.int16) == ref.view(torch.int16)
    assert torch.all(same | (torch.isnan(out) & torch.isnan(ref)))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="block must be a positive int, got 0"):
        quant.quantize(torch.randn(4), 0)
    with pytest.raises(ValueError, match="x.dtype"):
        quant.quantize(torch.arange(4), 2)
    with pytest.raises(ValueError, match="codes must be a contiguous torch.int8 tensor of 4"):
        quant.dequantize(torch.zeros(3, dtype=torch.int8), torch.ones(1), (4,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,block", [(1000, 256), (1000, 33), (3_000_001, 128)])
def test_cuda_matches_reference_bitwise(n, block, dtype):
    x = _input(n, dtype).cuda()
    x[3] = float("nan")
    x[7] = float("inf")
    codes, scales = quant.quantize(x, block, backend="cuda")
    rc, rs = quant.quantize_reference(x.cpu(), block)
    assert torch.equal(codes.cpu(), rc)
    torch.testing.assert_close(scales.cpu(), rs, rtol=0, atol=0)
    y = quant.dequantize(codes, scales, x.shape, dtype, block, backend="cuda")
    ref = quant.dequantize_reference(rc, rs, x.shape, dtype, block)
    torch.testing.assert_close(y.cpu(), ref, rtol=0, atol=0, equal_nan=True)


def test_cuda_codec_reports_no_device_instead_of_crashing():
    from fastdume.ops._ext import cuda_ext

    ext = cuda_ext()
    if ext is None:
        pytest.skip("fastdume._C_cuda not built (no nvcc at install time)")
    if torch.cuda.is_available():
        pytest.skip("a device is present")
    info = ext.device_query()
    assert info["available"] is False and info["reason"].startswith("no device")
    with pytest.raises(RuntimeError, match="no device"):
        ext.quantize_int8(0, 0, 16, 8, 0, 0, 0)
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        quant.quantize(torch.randn(8), 8, backend="cuda")
