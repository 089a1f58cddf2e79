"""fastdume.ops.moe: Triton routing, dispatch and grouped GEMMs (interpreter on CPU) and the torch
path, against independent references (float64 dense per-token loops, torch.sort routing)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from poisoning import poisoned

from fastdume.ops import moe

FEW = settings(max_examples=12, deadline=None, derandomize=True)


def dense_reference(x, weights, ids, gate_up, down):
    """float64, one token at a time: sum_j w_j * down_j(silu(gate_j x) * up_j x)."""
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    inter = down.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = gate_up[e, :inter] @ x[t], gate_up[e, inter:] @ x[t]
            out[t] += float(weights[t, j]) * (down[e] @ (F.silu(gate) * up))
    return out


def make_router(num_experts, hidden, mode, dtype=torch.float32):
    """Router weight and bias for a routing pattern: uniform, skewed or all-to-one."""
    weight = torch.randn(num_experts, hidden, dtype=dtype)
    bias = torch.randn(num_experts, dtype=dtype)
    if mode == "skewed":
        bias[0] += 3.0
    elif mode == "all_to_one":
        bias[num_experts - 1] += 1e4
    return weight, bias


def make_experts(num_experts, hidden, inter, dtype=torch.float32):
    gate_up = torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter) / inter**0.5
    return gate_up.to(dtype), down.to(dtype)


shapes = st.tuples(
    st.integers(0, 100),  # T
    st.integers(1, 8),  # E
    st.integers(1, 4),  # k (clipped to E)
    st.sampled_from([17, 33, 50]),  # H: not a multiple of the 32/64 tiles
    st.sampled_from([23, 40, 45]),  # I
    st.sampled_from(["uniform", "skewed", "all_to_one"]),
)


@FEW
@given(shapes, st.booleans(), st.floats(0.3, 3.0))
def test_route_triton_matches_torch(shape, with_bias, temperature):
    torch.manual_seed(0)
    num_tokens, num_experts, top_k, hidden, _, mode = shape
    top_k = min(top_k, num_experts)
    x = torch.randn(num_tokens, hidden)
    weight, bias = make_router(num_experts, hidden, mode)
    bias = bias if with_bias else None
    from fastdume.kernels.moe_routing import route as route_kernel

    with poisoned():
        got_w, got_ids = route_kernel(x, weight, bias, top_k, temperature)
    ref_w, ref_ids = moe.route_torch(x, weight, bias, top_k, temperature)
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)


def test_route_ties_nan_and_dead_rows():
    """Ties go to the lower index, NaN never beats a finite logit, an all-NaN row gets 0..k-1."""
    torch.manual_seed(1)
    # Small integers: every logit is exact, so ties are real ties (many of them).
    weight = torch.randint(-2, 3, (6, 24)).float()
    x = torch.randint(-1, 2, (40, 24)).float()
    x[7, 2] = float("nan")  # all logits of token 7 are NaN
    bias = torch.zeros(6)
    logits = x.double() @ weight.double().T
    for backend in ("torch", "triton"):
        w, ids = moe.route(x, weight, bias, top_k=3, backend=backend)
        assert torch.equal(ids[7], torch.tensor([0, 1, 2]))
        torch.testing.assert_close(w[7], torch.full((3,), 1 / 3))
        for t in (t for t in range(40) if t != 7):
            want = sorted(range(6), key=lambda e, t=t: (-logits[t, e].item(), e))[:3]
            assert ids[t].tolist() == want
    nan_bias = torch.tensor([float("nan"), 0.0, 0.0, 0.0, 0.0, 0.0])
    for backend in ("torch", "triton"):
        _, ids = moe.route(x[:6], weight, nan_bias, top_k=2, backend=backend)
        assert (ids != 0).all()  # a NaN logit ranks below every finite one


@FEW
@given(shapes)
def test_align_groups_slots_by_expert(shape):
    num_tokens, num_experts, top_k, _, _, mode = shape
    top_k = min(top_k, num_experts)
    g = torch.Generator().manual_seed(num_tokens)
    ids = torch.rand(num_tokens, num_experts, generator=g).argsort(dim=1)[:, :top_k]
    if mode == "all_to_one" and top_k == 1:
        ids[:] = num_experts - 1
    from fastdume.kernels.moe_align import align

    block_m = 16
    with poisoned():
        sorted_slots, block_expert = align(ids, num_experts, block_m)
    flat, sentinel = ids.reshape(-1), ids.numel()
    want_slots, want_blocks = [], []
    for e in range(num_experts):
        mine = (flat == e).nonzero().flatten().tolist()
        padded = -(-len(mine) // block_m) * block_m
        want_slots += mine + [sentinel] * (padded - len(mine))
        want_blocks += [e] * (padded // block_m)
    want_slots += [sentinel] * (sorted_slots.numel() - len(want_slots))
    want_blocks += [-1] * (block_expert.numel() - len(want_blocks))
    assert sorted_slots.tolist() == want_slots
    assert block_expert.tolist() == want_blocks


@settings(max_examples=8, deadline=None, derandomize=True)
@given(shapes, st.booleans())
def test_fused_moe_triton_matches_float64_reference(shape, with_bias):
    torch.manual_seed(2)
    num_tokens, num_experts, top_k, hidden, inter, mode = shape
    top_k = min(top_k, num_experts)
    x = torch.randn(num_tokens, hidden)
    weight, bias = make_router(num_experts, hidden, mode)
    bias = bias if with_bias else None
    gate_up, down = make_experts(num_experts, hidden, inter)
    ref_w, ref_ids = moe.route_torch(x, weight, bias, top_k, 1.0)
    want = dense_reference(x, ref_w, ref_ids, gate_up, down)
    with poisoned():
        got = moe.fused_moe(x, weight, bias, gate_up, down, top_k=top_k, backend="triton")
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        moe.fused_moe(x, weight, bias, gate_up, down, top_k=top_k, backend="torch").double(),
        want,
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_experts_half_precision(dtype, top_k):
    """bf16/fp16 storage, fp32 accumulation (the interpreter upcasts the tiles for tl.dot)."""
    torch.manual_seed(3)
    x = torch.randn(70, 45).to(dtype)
    weight, bias = make_router(5, 45, "skewed")
    gate_up, down = make_experts(5, 45, 38, dtype)
    w, ids = moe.route(x, weight, bias, top_k=top_k)
    want = dense_reference(x, w, ids, gate_up, down)
    with poisoned():
        got = moe.moe_experts(x, w, ids, gate_up, down, backend="triton")
    assert got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_experts_with_no_tokens_and_empty_batch():
    torch.manual_seed(4)
    gate_up, down = make_experts(6, 33, 40)
    x = torch.randn(20, 33)
    ids = torch.tensor([[4, 1]] * 20)  # experts 0, 2, 3, 5 receive nothing
    w = torch.rand(20, 2)
    for backend in ("torch", "triton"):
        with poisoned():
            got = moe.moe_experts(x, w, ids, gate_up, down, backend=backend)
        want = dense_reference(x, w, ids, gate_up, down)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        empty = moe.moe_experts(x[:0], w[:0], ids[:0], gate_up, down, backend=backend)
        assert empty.shape == (0, 33)


def test_triton_path_is_deterministic():
    torch.manual_seed(5)
    x = torch.randn(90, 50)
    weight, bias = make_router(4, 50, "uniform")
    gate_up, down = make_experts(4, 50, 23)
    runs = [moe.fused_moe(x, weight, bias, gate_up, down, top_k=2, backend="triton")
            for _ in range(2)]  # fmt: skip
    assert torch.equal(runs[0], runs[1])


def _grads(backend, x, weight, bias, gate_up, down, top_k, temperature, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, gate_up, down)]
    out = moe.fused_moe(*leaves, top_k=top_k, temperature=temperature, backend=backend)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True, materialize_grads=True)
    return [out, *grads]


@settings(max_examples=5, deadline=None, derandomize=True)
@given(shapes)
def test_backward_matches_torch_autograd(shape):
    """Gradients of the Triton path (custom op + torch-op backward) vs autograd through the
    torch path, for hidden states, both expert weights and the router weight and bias."""
    torch.manual_seed(6)
    num_tokens, num_experts, top_k, hidden, inter, mode = shape
    num_tokens, top_k = num_tokens // 2, min(top_k, num_experts)
    x = torch.randn(num_tokens, hidden)
    weight, bias = make_router(num_experts, hidden, mode)
    gate_up, down = make_experts(num_experts, hidden, inter)
    grad_out = torch.randn(num_tokens, hidden)
    want = _grads("torch", x, weight, bias, gate_up, down, top_k, 0.7, grad_out)
    got = _grads("triton", x, weight, bias, gate_up, down, top_k, 0.7, grad_out)
    names = ["out", "hidden_states", "router_weight", "router_bias", "gate_up_proj", "down_proj"]
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if top_k > 1 and num_tokens and mode == "uniform":
        assert want[2].abs().sum() > 0  # the router does get a gradient through the softmax


def test_experts_backward_float64():
    """The backward op in float64 against autograd through the float64 torch path."""
    torch.manual_seed(7)
    x = torch.randn(30, 13, dtype=torch.float64, requires_grad=True)
    w = torch.rand(30, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.rand(30, 5).argsort(dim=1)[:, :3]
    ids[:10] = torch.tensor([4, 0, 2])  # skewed; expert 1 and 3 get fewer rows
    gate_up = (torch.randn(5, 22, 13, dtype=torch.float64) / 4).requires_grad_()
    down = (torch.randn(5, 13, 11, dtype=torch.float64) / 4).requires_grad_()
    inputs = (x, w, gate_up, down)

    def fn(x, w, gate_up, down):
        return moe.experts_torch(x, w, ids, gate_up, down)

    from fastdume.ops.moe_triton import experts_backward

    out = fn(*inputs)
    grad_out = torch.randn_like(out)
    want = torch.autograd.grad(out, inputs, grad_out)
    got = experts_backward(grad_out, *(t.detach() for t in (x, w)), ids,
                           gate_up.detach(), down.detach())  # fmt: skip
    for g, ww in zip(got, want, strict=True):
        # the torch path sums the k weighted slots in fp32, so the reference is fp32-rounded
        torch.testing.assert_close(g, ww, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [None, "torch", "triton"])
def test_fused_moe_resolves_the_backend_once(backend, monkeypatch):
    """Only ops chooses a backend, once per call: routing and experts run on that choice."""
    from fastdume.ops import _backend

    calls = []
    real = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda *a: calls.append(a) or real(*a))
    torch.manual_seed(10)
    x = torch.randn(9, 17)
    weight, bias = make_router(3, 17, "uniform")
    gate_up, down = make_experts(3, 17, 20)
    got = moe.fused_moe(x, weight, bias, gate_up, down, top_k=2, backend=backend)
    assert len(calls) == 1
    w, ids = moe.route_torch(x, weight, bias, 2, 1.0)
    want = dense_reference(x, w, ids, gate_up, down)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_argument():
    x = torch.randn(4, 8)
    weight, bias = make_router(3, 8, "uniform")
    gate_up, down = make_experts(3, 8, 5)
    cases = [
        (dict(hidden_states=torch.randn(4, 8, 1)), "hidden_states"),
        (dict(router_weight=torch.randn(3, 9)), "router_weight"),
        (dict(router_bias=torch.randn(4)), "router_bias"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=4), "top_k"),
        (dict(temperature=0.0), "temperature"),
        (dict(gate_up_proj=torch.randn(3, 10, 9)), "gate_up_proj"),
        (dict(down_proj=torch.randn(3, 8, 6)), "down_proj"),
        (dict(down_proj=down.to(torch.float64)), "down_proj"),
        (dict(gate_up_proj=gate_up.transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
        (dict(router_weight=weight.to("meta")), "router_weight"),
        (dict(gate_up_proj=gate_up.to("meta")), "gate_up_proj"),
        (dict(backend="cuda"), "backend"),
        (
            dict(
                hidden_states=x.double(),
                gate_up_proj=gate_up.double(),
                down_proj=down.double(),
                backend="triton",
            ),
            "hidden_states",
        ),  # fmt: skip
    ]
    base = dict(hidden_states=x, router_weight=weight, router_bias=bias, gate_up_proj=gate_up,
                down_proj=down, top_k=1)  # fmt: skip
    for change, needle in cases:
        with pytest.raises(ValueError, match=needle):
            moe.fused_moe(**{**base, **change})


def test_index_math_past_int32():
    """Row offsets of T*k*H > 2^31 elements (index tensors only): the kernels' 64-bit helper."""
    from fastdume.kernels.moe_align import row_offsets

    num_tokens, top_k, hidden = 2**19, 2, 8192
    assert num_tokens * top_k * hidden > 2**31
    slots = torch.arange(num_tokens * top_k, dtype=torch.int32).flip(0)
    got = row_offsets(slots, top_k, hidden)
    want = (slots.long() // top_k) * hidden
    assert got.max() > 2**31 and torch.equal(got, want)


def test_configs_shipped_and_default():
    from fastdume.ops import moe_configs

    shipped = moe_configs.all_shipped()
    assert any(name == "default.json" for name, *_ in shipped)
    h100 = "NVIDIA H100 80GB HBM3"
    data = moe_configs.load_file(moe_configs.file_name(h100))
    key = moe_configs.shape_key(5, 768, 3072, torch.bfloat16)
    buckets = data["shapes"][key]["buckets"]

    def full(config):  # a file's config with the design defaults filled in
        return moe_configs.validate(config, "test")

    assert moe_configs.get_config(5, 768, 3072, torch.bfloat16, h100, 1) == full(
        buckets[0]["config"]
    )
    assert moe_configs.get_config(5, 768, 3072, torch.bfloat16, h100, 10**6) == full(
        buckets[-1]["config"]
    )
    default = moe_configs.load_file("default.json")["buckets"]
    assert moe_configs.get_config(3, 100, 200, torch.float32, "Unknown GPU", 1) == full(
        default[0]["config"]
    )
    assert moe_configs.get_config(5, 768, 3072, torch.bfloat16, None, 5000) == full(
        default[-1]["config"]
    )
    with pytest.raises(ValueError, match="BLOCK_M"):
        moe_configs.validate({"gemm1": {}, "gemm2": {}}, "test")


def test_autotune_cache(tmp_path):
    """The autotuner keeps the fastest candidate per key on disk and reuses it."""
    from fastdume.ops import moe_configs

    configs = moe_configs.candidates()
    assert len(configs) >= 3
    cost = {id(c): i for i, c in enumerate(reversed(configs))}  # the last one is fastest
    path = tmp_path / "tune.json"
    best = moe_configs.tuned_config("k1", configs, lambda c: cost[id(c)], path)
    assert best == configs[-1]

    def must_not_run(config):
        raise AssertionError("cached key was re-measured")

    assert moe_configs.tuned_config("k1", configs, must_not_run, path) == configs[-1]
    assert moe_configs.tuned_config("k2", configs, lambda c: -cost[id(c)], path) == configs[0]
    path.write_text("{not json")  # a corrupt cache is ignored and rewritten
    assert moe_configs.tuned_config("k1", configs, lambda c: cost[id(c)], path) == configs[-1]
    assert moe_configs.token_bucket(1) == 1 and moe_configs.token_bucket(100) == 128


@pytest.mark.gpu
def test_gpu_batch_invariance_and_bf16():
    torch.manual_seed(8)
    dev = torch.device("cuda")
    x = torch.randn(300, 768, device=dev, dtype=torch.bfloat16)
    weight, bias = (t.to(dev) for t in make_router(5, 768, "uniform"))
    gate_up, down = (t.to(dev) for t in make_experts(5, 768, 1024, torch.bfloat16))
    full = moe.fused_moe(x, weight, bias, gate_up, down, top_k=2)
    part = moe.fused_moe(x[100:180], weight, bias, gate_up, down, top_k=2)
    assert torch.equal(full[100:180], part)  # 80 and 300 tokens share a config bucket
    want = moe.fused_moe(x, weight, bias, gate_up, down, top_k=2, backend="torch")
    torch.testing.assert_close(full, want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_decode():
    torch.manual_seed(9)
    dev = torch.device("cuda")
    x = torch.randn(4, 512, device=dev, dtype=torch.bfloat16)
    weight, bias = (t.to(dev) for t in make_router(4, 512, "uniform"))
    gate_up, down = (t.to(dev) for t in make_experts(4, 512, 768, torch.bfloat16))
    run = lambda: moe.fused_moe(x, weight, bias, gate_up, down, top_k=2)
    eager = run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(captured, run())
    assert not torch.equal(captured, eager)
