"""Gram accumulation (fastdume.ops.gram): Triton kernel (interpreter on CPU) and torch path
against a float64 reference, with the upper triangle poisoned to prove it is never written."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdume.ops.gram import gram_accumulate, gram_accumulate_triton, symmetrize

SMALL = {"block_h": 16, "block_n": 16, "split_k": 1, "num_warps": 4, "num_stages": 1}


def _hidden(layers, n, h, dtype, heavy=False):
    """Hidden-state-like data; heavy=True adds Student-t tails and a few massive channels."""
    x = torch.randn(layers, n, h, dtype=torch.float64)
    if heavy:
        x = torch.distributions.StudentT(3.0).sample((layers, n, h)).double()
        massive = torch.randperm(h)[: max(1, h // 16)]
        x[..., massive] *= 50.0
        x += 0.5 * torch.randn(h, dtype=torch.float64)  # non-zero channel means
    return x.to(dtype)


def _stats(layers, h, dtype):
    """Random existing statistics (lower triangle) with a NaN-poisoned strict upper triangle."""
    lower = torch.ones(h, h, dtype=torch.bool).tril()
    gram = torch.where(lower, torch.randn(layers, h, h, dtype=dtype), float("nan"))
    return gram, torch.randn(layers, h, dtype=dtype)


def _check(x, gram0, sum0, gram, colsum, count, mask, rtol):
    xs = x.double() if mask is None else x.double()[:, mask.bool()]
    ref = symmetrize(gram0.double()) + xs.transpose(-1, -2) @ xs
    upper = torch.ones(x.shape[-1], x.shape[-1], dtype=torch.bool).triu(1)
    assert count == xs.shape[1]
    assert torch.isnan(gram[:, upper]).all(), "upper triangle was written"
    scale = ref.abs().amax()
    torch.testing.assert_close(symmetrize(gram).double(), ref, rtol=0, atol=rtol * scale)
    ref_sum = sum0.double() + xs.sum(1)
    torch.testing.assert_close(colsum.double(), ref_sum, rtol=0, atol=rtol * ref_sum.abs().max())


@pytest.mark.parametrize(
    "layers,n,h,x_dtype,g_dtype,use_mask",
    [
        (1, 50, 40, torch.float32, torch.float32, False),
        (3, 37, 33, torch.bfloat16, torch.float64, True),
        (2, 64, 16, torch.float16, torch.float32, True),
        (1, 21, 50, torch.float32, torch.float64, True),
        (2, 1100, 20, torch.bfloat16, torch.float64, True),  # 3 accumulation chunks of 512 tokens
    ],
)
def test_triton_matches_float64(layers, n, h, x_dtype, g_dtype, use_mask):
    x = _hidden(layers, n, h, x_dtype)
    mask = (torch.rand(n) > 0.3) if use_mask else None
    gram, colsum = _stats(layers, h, g_dtype)
    gram0, sum0 = gram.clone(), colsum.clone()
    count = gram_accumulate(x, gram, colsum, mask, backend="triton")
    _check(x, gram0, sum0, gram, colsum, count, mask, rtol=1e-5)


def test_unbatched_noncontiguous_and_float_mask():
    h, n = 24, 40
    x = _hidden(1, h, n, torch.float32)[0].T  # [n, h] view with strides (1, n)
    mask = (torch.rand(n) > 0.5).float()
    gram, colsum = _stats(1, h, torch.float32)
    gram0, sum0 = gram.clone(), colsum.clone()
    count = gram_accumulate(x, gram[0], colsum[0], mask, backend="triton")
    _check(x[None], gram0, sum0, gram, colsum, count, mask, rtol=1e-5)


def test_split_k_atomic_path():
    x = _hidden(2, 70, 20, torch.bfloat16)
    gram, colsum = _stats(2, 20, torch.float64)
    gram0, sum0 = gram.clone(), colsum.clone()
    count = gram_accumulate_triton(x, gram, colsum, config={**SMALL, "split_k": 3})
    _check(x, gram0, sum0, gram, colsum, count, None, rtol=1e-5)


@pytest.mark.parametrize("precision,bound", [(None, 2e-6), ("tf32x3", 2e-6), ("bf16", 2e-2)])
def test_heavy_tailed_accuracy(precision, bound):
    """Relative Frobenius error of G vs float64 on heavy-tailed hidden states."""
    x64 = _hidden(1, 256, 32, torch.float64, heavy=True)
    gram = torch.zeros(1, 32, 32, dtype=torch.float32)
    colsum = torch.zeros(1, 32, dtype=torch.float32)
    gram_accumulate(x64.float(), gram, colsum, precision=precision, backend="triton")
    ref = x64[0].T @ x64[0]
    err = torch.linalg.norm(symmetrize(gram[0]).double() - ref) / torch.linalg.norm(ref)
    assert err <= bound, f"relative error {err:.3g} above {bound}"


def test_bf16_inputs_are_exact_products():
    """bf16 x bf16 products are exact in fp32: the kernel equals fp64 on the bf16 values."""
    x = _hidden(1, 128, 32, torch.bfloat16, heavy=True)
    gram = torch.zeros(1, 32, 32, dtype=torch.float64)
    colsum = torch.zeros(1, 32, dtype=torch.float64)
    gram_accumulate(x, gram, colsum, backend="triton")
    ref = x[0].double().T @ x[0].double()
    err = torch.linalg.norm(symmetrize(gram[0]) - ref) / torch.linalg.norm(ref)
    assert err <= 1e-6


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 2),
    n=st.integers(0, 40),
    h=st.integers(1, 35),
    masked=st.booleans(),
)
def test_triton_equals_torch_backend(layers, n, h, masked):
    x = _hidden(layers, n, h, torch.float32)
    mask = (torch.rand(n) > 0.4) if masked else None
    g_t, s_t = _stats(layers, h, torch.float32)
    g_r, s_r = g_t.clone(), s_t.clone()
    c_t = gram_accumulate(x, g_t, s_t, mask, backend="triton")
    c_r = gram_accumulate(x, g_r, s_r, mask, backend="torch")
    assert c_t == c_r
    torch.testing.assert_close(g_t, g_r, rtol=1e-5, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(s_t, s_r, rtol=1e-5, atol=1e-4)


def test_fp64_precision_runs_the_float64_torch_path():
    x = _hidden(1, 30, 20, torch.float32, heavy=True)
    gram = torch.zeros(1, 20, 20, dtype=torch.float64)
    colsum = torch.zeros(1, 20, dtype=torch.float64)
    gram_accumulate(x, gram, colsum, precision="fp64", backend="triton")
    ref = x[0].double().T @ x[0].double()
    torch.testing.assert_close(symmetrize(gram[0]), ref, rtol=1e-13, atol=0)


def test_bad_input_names_the_argument():
    x = torch.randn(8, 4)
    gram, colsum = torch.zeros(4, 4), torch.zeros(4)
    with pytest.raises(ValueError, match="gram must be"):
        gram_accumulate(x, torch.zeros(3, 3), colsum, backend="triton")
    with pytest.raises(ValueError, match="mask must be"):
        gram_accumulate(x, gram, colsum, torch.ones(7, dtype=torch.bool), backend="triton")
    with pytest.raises(ValueError, match="precision must be"):
        gram_accumulate(x, gram, colsum, precision="fp8", backend="triton")
    with pytest.raises(ValueError, match="x must be float32, bfloat16 or float16"):
        gram_accumulate(x.double(), gram, colsum, backend="triton")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gram_accumulate(torch.full((8, 4), float("inf")), gram, colsum, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layers,n,h", [(1, 4096, 300), (3, 1000, 769)])
def test_gpu_configs_match_float64(layers, n, h, x_dtype):
    """The shipped GPU tiles (128, split-K when the grid is small) on a real device."""
    x = _hidden(layers, n, h, x_dtype, heavy=True).cuda()
    mask = (torch.rand(n) > 0.2).cuda()
    gram, colsum = (t.cuda() for t in _stats(layers, h, torch.float64))
    gram0, sum0 = gram.clone(), colsum.clone()
    count = gram_accumulate(x, gram, colsum, mask)  # backend=None: Triton on CUDA
    _check(x.cpu(), gram0.cpu(), sum0.cpu(), gram.cpu(), colsum.cpu(), count, mask.cpu(), 1e-5)


@pytest.mark.parametrize(
    "layers,n,h,schedule",
    [
        (2, 70, 20, {"split_k": 3, "ordered_split": True}),  # fixed-order split reduction
        (1, 45, 50, {"group_h": 3}),  # grouped order, 4 tiles: a short last group
        (2, 33, 40, {"group_h": 2, "split_k": 2, "ordered_split": True}),
        (1, 1, 1, {"group_h": 4, "split_k": 2, "ordered_split": True}),  # T = 1, H = 1
        (1, 40, 37, {"block_h": 32, "group_h": 1}),  # larger tile than the other cases
    ],
)
def test_tile_schedules_match_float64(layers, n, h, schedule):
    """The tuner's schedule options (grouped order, ordered split-K, tile size) all give the
    float64 answer, touch only the lower triangle, and keep existing statistics."""
    x = _hidden(layers, n, h, torch.bfloat16)
    mask = torch.rand(n) > 0.2
    mask[0] = True
    gram, colsum = _stats(layers, h, torch.float64)
    gram0, sum0 = gram.clone(), colsum.clone()
    count = gram_accumulate_triton(x, gram, colsum, mask, config={**SMALL, **schedule})
    _check(x, gram0, sum0, gram, colsum, count, mask, rtol=1e-5)


def test_ordered_split_is_bitwise_reproducible():
    """Partials reduced in split order: the same bits on every run (fp32 store, where atomics'
    order would show)."""
    x = _hidden(1, 90, 24, torch.float32, heavy=True)
    cfg = {**SMALL, "split_k": 4, "ordered_split": True}
    runs = []
    for _ in range(2):
        gram, colsum = torch.zeros(1, 24, 24), torch.zeros(1, 24)
        gram_accumulate_triton(x, gram, colsum, config=cfg)
        runs.append((gram, colsum))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    one = torch.zeros(1, 24, 24), torch.zeros(1, 24)
    gram_accumulate_triton(x, *one, config=SMALL)
    torch.testing.assert_close(runs[0][0].tril(), one[0].tril(), rtol=1e-5, atol=1e-3)
