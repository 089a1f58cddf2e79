"""fastdume.ops.grouped_linear: the Triton grouped GEMM (interpreter on CPU) and the torch path
against a float64 per-token loop, their gradients, the per-token gathers, and bad input."""

import pytest
import torch
from poisoning import poisoned

from fastdume.ops import grouped_linear as gl

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def reference(x, weight, ids, bias=None):
    """float64, one token at a time: weight[e_t] @ x[t] + bias[e_t]."""
    rows = []
    for t in range(x.shape[0]):
        e = int(ids[t])
        row = weight[e].double() @ x[t].double()
        rows.append(row if bias is None else row + bias[e].double())
    return torch.stack(rows) if rows else torch.zeros(0, weight.shape[1], dtype=torch.float64)


def make(num_tokens, num_experts, k, n, dtype=torch.float32, bias=True, experts=None, seed=0):
    """Random inputs; ids drawn from `experts` (default: all), so some experts can get none."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, k, generator=g).to(dtype)
    weight = (torch.randn(num_experts, n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(num_experts, n, generator=g).to(dtype) if bias else None
    pool = torch.tensor(experts if experts is not None else range(num_experts))
    ids = pool[torch.randint(0, len(pool), (num_tokens,), generator=g)]
    return x, weight, ids, b


def assert_matches(got, x, weight, ids, bias):
    want = reference(x, weight, ids, bias)
    assert got.dtype == x.dtype and got.shape == want.shape
    rtol, atol = TOL[x.dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


# (T, E, K, N, experts with tokens): T = 1, T not a multiple of BLOCK_M 16, E = 1, experts with
# no tokens (1 and 2 of 4), K and N not multiples of the 32-wide interpreter tiles.
CASES = [
    (1, 3, 40, 50, None),
    (37, 4, 45, 70, [0, 3]),
    (16, 1, 33, 64, None),
    (50, 5, 64, 96, None),
    (9, 2, 17, 31, [1]),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}E{c[1]}K{c[2]}N{c[3]}")
def test_matches_float64_reference(case, bias, backend):
    num_tokens, num_experts, k, n, experts = case
    x, weight, ids, b = make(num_tokens, num_experts, k, n, bias=bias, experts=experts)
    with poisoned():
        got = gl.grouped_linear(x, weight, ids, b, backend=backend)
    assert_matches(got, x, weight, ids, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_inputs(dtype):
    """Triton (16-bit tiles upcast under the interpreter, fp32 accumulation) and torch paths
    against float64 on the same rounded inputs, to within one output rounding."""
    x, weight, ids, b = make(45, 3, 48, 80, dtype=dtype, experts=[0, 2])
    with poisoned():
        got = gl.grouped_linear(x, weight, ids, b, backend="triton")
    assert_matches(got, x, weight, ids, b)
    assert_matches(gl.grouped_linear(x, weight, ids, b, backend="torch"), x, weight, ids, b)


@pytest.mark.parametrize("name", list(gl.CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_shipped_config_under_the_interpreter(name, dtype):
    """The GPU tile shapes themselves (not just the interpreter's), on rows that straddle their
    blocks and columns that straddle their tiles."""
    from fastdume.kernels.grouped_linear import grouped_linear

    config = gl.for_dtype(gl.tiles(gl.CONFIGS[name]), dtype)
    x, weight, ids, b = make(150, 3, 70, 140, dtype=dtype, experts=[0, 2], seed=3)
    with poisoned():
        got = grouped_linear(x, weight, ids, b, config)
    assert_matches(got, x, weight, ids, b)


def test_a_tokens_row_does_not_depend_on_the_batch():
    x, weight, ids, b = make(40, 3, 32, 48)
    whole = gl.grouped_linear(x, weight, ids, b, backend="triton")
    part = gl.grouped_linear(x[5:12], weight, ids[5:12], b, backend="triton")
    assert torch.equal(whole[5:12], part)


def test_one_expert_for_every_token_and_strided_x():
    """The torch path's no-gather shortcut, and a non-contiguous x on both paths."""
    x, weight, _, b = make(30, 3, 24, 40)
    ids = torch.full((30,), 2)
    wide = torch.randn(30, 48)
    wide[:, ::2] = x
    for backend in ("torch", "triton"):
        assert_matches(gl.grouped_linear(x, weight, ids, b, backend=backend), x, weight, ids, b)
        got = gl.grouped_linear(wide[:, ::2], weight, ids, b, backend=backend)
        assert_matches(got, x, weight, ids, b)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_torch_path_contiguous_runs(bias):
    """Experts 0 and 2 on contiguous runs (written in place without grad), expert 1 on two
    separate runs (gathered): with and without autograd."""
    x, weight, _, b = make(30, 3, 24, 40, bias=bias)
    ids = torch.tensor([2] * 7 + [1] * 5 + [0] * 9 + [1] * 9)
    with torch.no_grad(), poisoned():
        got = gl.grouped_linear(x, weight, ids, b, backend="torch")
    assert_matches(got, x, weight, ids, b)
    leaf = weight.clone().requires_grad_()
    assert_matches(gl.grouped_linear(x, leaf, ids, b, backend="torch").detach(), x, weight, ids, b)


def test_no_tokens_and_int32_ids():
    x, weight, ids, b = make(0, 3, 16, 24)
    for backend in ("torch", "triton"):
        assert gl.grouped_linear(x, weight, ids, b, backend=backend).shape == (0, 24)
    x, weight, ids, b = make(20, 3, 16, 24)
    got = gl.grouped_linear(x, weight, ids.int(), b, backend="triton")
    assert_matches(got, x, weight, ids, b)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_gradients_match_float64_autograd(bias):
    """Both paths' gradients (Triton: the custom op's torch backward) against autograd through
    the float64 per-token reference, experts 1 of 3 without tokens (its dW must be 0)."""
    x, weight, ids, b = make(23, 3, 20, 36, bias=bias, experts=[0, 2])
    grad_out = torch.randn(23, 36)
    leaves = [t.double().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    (reference(*leaves[:2], ids, leaves[2] if bias else None) * grad_out.double()).sum().backward()
    for backend in ("triton", "torch"):
        inputs = [t.clone().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
        out = gl.grouped_linear(*inputs[:2], ids, inputs[2] if bias else None, backend=backend)
        (out * grad_out).sum().backward()
        for got, want in zip(inputs, leaves, strict=True):
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)
        assert torch.equal(inputs[1].grad[1], torch.zeros_like(weight[1]))


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    x, weight, ids, b = make(12, 2, 16, 24)
    for args in ((x, weight, ids, b), (x, weight, ids, None)):
        args = (args[0].requires_grad_(), args[1].requires_grad_(), *args[2:])
        torch.library.opcheck(torch.ops.fastdume.grouped_linear.default, args)


@pytest.mark.parametrize("check_ids", [True, False], ids=["checked", "unchecked"])
def test_gather_rows_and_vectors(check_ids):
    g = torch.Generator().manual_seed(5)
    table = torch.randn(3, 11, 8, generator=g, requires_grad=True)
    norms = torch.randn(3, 8, generator=g, requires_grad=True)
    experts = torch.tensor([2, 0, 0, 2, 1, 2, 2])
    tokens = torch.tensor([10, 0, 3, 3, 7, 10, 1])
    rows = gl.gather_rows(table, experts, tokens, check_ids=check_ids)
    vectors = gl.gather_vectors(norms, experts, check_ids=check_ids)
    for t in range(7):
        e, v = int(experts[t]), int(tokens[t])
        assert torch.equal(rows[t], table[e, v]) and torch.equal(vectors[t], norms[e])
    # Gradients land on the rows used, summed over repeats (expert 2's token 10 twice).
    (rows.sum() + vectors.sum()).backward()
    want = torch.zeros(3, 11)
    want.index_put_((experts, tokens), torch.ones(7), accumulate=True)
    assert torch.equal(table.grad, want[..., None].expand(3, 11, 8))
    count = torch.bincount(experts, minlength=3).float()
    assert torch.equal(norms.grad, count[:, None].expand(3, 8))


def spread(ids):
    """ids with one 0 and one 3 (past E = 3) in them."""
    return ids.index_fill(0, torch.tensor([4]), 3).index_fill(0, torch.tensor([5]), 0)


BAD = [
    ("x must be \\[T, K\\]", lambda x, w, i, b: (x[0], w, i, b)),
    ("weight must be \\[E, N, K=16\\]", lambda x, w, i, b: (x, w[:, :, :8], i, b)),
    ("weight must be \\[E, N, K=16\\]", lambda x, w, i, b: (x, w[0], i, b)),
    ("weight must hold at least one expert", lambda x, w, i, b: (x, w[:0], i, b[:0])),
    ("bias must be \\[E=3, N=24\\]", lambda x, w, i, b: (x, w, i, b[:, :5])),
    ("weight has dtype torch.float16", lambda x, w, i, b: (x, w.half(), i, b)),
    ("bias has dtype torch.float64", lambda x, w, i, b: (x, w, i, b.double())),
    ("weight must be contiguous", lambda x, w, i, b: (x, w.transpose(1, 2).contiguous().mT, i, b)),
    ("expert_ids must be int64 or int32", lambda x, w, i, b: (x, w, i.float(), b)),
    ("expert_ids must be \\[T=10\\]", lambda x, w, i, b: (x, w, i[:4], b)),
    ("expert_ids must lie in 0..2, got values in 0..3", lambda x, w, i, b: (x, w, spread(i), b)),
    ("expert_ids must lie in 0..2, got values in -1", lambda x, w, i, b: (x, w, i * 0 - 1, b)),
]


@pytest.mark.parametrize("match,mutate", BAD, ids=[m for m, _ in BAD])
def test_bad_input_names_the_argument(match, mutate):
    x, weight, ids, b = make(10, 3, 16, 24)
    with pytest.raises(ValueError, match=match):
        gl.grouped_linear(*mutate(x, weight, ids, b))


def test_bad_backend_dtype_and_unchecked_ids():
    x, weight, ids, b = make(10, 3, 16, 24)
    with pytest.raises(ValueError, match="backend must be one of"):
        gl.grouped_linear(x, weight, ids, b, backend="cuda")
    with pytest.raises(ValueError, match="x dtype must be one of .* for backend='triton'"):
        gl.grouped_linear(x.double(), weight.double(), ids, b.double(), backend="triton")
    # Unchecked ids past E still never leave rows unset on the torch path.
    with pytest.raises(ValueError, match="expert_ids must lie in 0..2, got 5"):
        gl.grouped_linear(x, weight, ids * 0 + 5, b, backend="torch", check_ids=False)


def test_bad_gather_input_names_the_argument():
    table, norms = torch.randn(3, 11, 8), torch.randn(3, 8)
    experts, tokens = torch.tensor([0, 2, 1]), torch.tensor([4, 10, 0])
    with pytest.raises(ValueError, match="table must be \\[E, V, H\\]"):
        gl.gather_rows(norms, experts, tokens)
    with pytest.raises(ValueError, match="token_ids must lie in 0..10, got values in 0..11"):
        gl.gather_rows(table, experts, torch.tensor([0, 11, 0]))
    with pytest.raises(ValueError, match="token_ids must be \\[T=3\\]"):
        gl.gather_rows(table, experts, tokens[:2])
    with pytest.raises(ValueError, match="expert_ids must lie in 0..2"):
        gl.gather_rows(table, experts + 1, tokens)
    with pytest.raises(ValueError, match="table must be \\[E, H\\]"):
        gl.gather_vectors(table, experts)
    with pytest.raises(ValueError, match="expert_ids must be int64 or int32"):
        gl.gather_vectors(norms, experts.float())
    # Unchecked: torch's own bounds check, never another expert's row.
    for bad_experts, bad_tokens in (
        (experts, tokens + 5),
        (experts - 1, tokens),
        (experts + 1, tokens),
    ):
        with pytest.raises(IndexError):
            gl.gather_rows(table, bad_experts, bad_tokens, check_ids=False)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 100, 2048])
@pytest.mark.parametrize("n", [576 * 3, 49152], ids=["qkv", "lm_head"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_triton_at_model_shapes(num_tokens, n, dtype):
    """The compiled kernel (every token class, bf16 with wgmma on sm_90) against float64, E 4
    with expert 1 idle, and the same rows as the torch path within one output rounding."""
    x, weight, ids, b = make(num_tokens, 4, 576, n, dtype=dtype, experts=[0, 2, 3])
    x, weight, ids, b = (t.cuda() for t in (x, weight, ids, b))
    with poisoned():
        got = gl.grouped_linear(x, weight, ids, b)
    want = torch.zeros(num_tokens, n, dtype=torch.float64, device="cuda")
    for e in range(4):
        rows = ids == e
        want[rows] = x[rows].double() @ weight[e].double().T + b[e].double()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(got, gl.grouped_linear(x, weight, ids, b, backend="torch"))
