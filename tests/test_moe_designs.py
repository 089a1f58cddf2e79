"""The fused MoE's design options (fastdume/ops/moe_configs: SWAP_AB, SPLIT_K, FUSED_ROUTING) under
the Triton interpreter, against the float64 per-token reference and torch.sort routing; plus the
config schema (old configs keep their meaning) and the autotuner's search space."""

import copy

import pytest
import torch
from test_moe import dense_reference, make_experts, make_router, poisoned

from fastdume.ops import moe, moe_configs

TILE = {"BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}


def config(fused=False, swap1=False, swap2=False, split=1, block_m=16):
    gemm2 = {**TILE, "SWAP_AB": swap2, "SPLIT_K": split}
    raw = {"BLOCK_M": block_m, "FUSED_ROUTING": fused, "gemm1": {**TILE, "SWAP_AB": swap1}}
    return moe_configs.validate({**raw, "gemm2": gemm2}, "test")


def expected_layout(ids, num_experts, block_m, size):
    """Slots grouped by expert in slot order, each segment padded to block_m with the sentinel."""
    flat, sentinel = ids.reshape(-1), ids.numel()
    slots, blocks = [], []
    for e in range(num_experts):
        mine = (flat == e).nonzero().flatten().tolist()
        padded = -(-len(mine) // block_m) * block_m
        slots += mine + [sentinel] * (padded - len(mine))
        blocks += [e] * (padded // block_m)
    slots += [sentinel] * (size - len(slots))
    blocks += [-1] * (-(-size // block_m) - len(blocks))
    return slots, blocks


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,block_m",
    [(1, 8, 2, 16), (0, 3, 1, 16), (37, 5, 2, 16), (20, 1, 1, 32), (70, 4, 3, 16)],
)
def test_route_align_one_launch_matches_route_then_layout(num_tokens, num_experts, top_k, block_m):
    from fastdume.kernels.moe_align import padded_size
    from fastdume.kernels.moe_routing import route_align

    torch.manual_seed(num_tokens)
    x = torch.randn(num_tokens, 33)
    weight, bias = make_router(num_experts, 33, "skewed")
    with poisoned():
        w, ids, sorted_slots, block_expert = route_align(x, weight, bias, top_k, 0.8, block_m)
    ref_w, ref_ids = moe.route_torch(x, weight, bias, top_k, 0.8)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    size = padded_size(num_tokens * top_k, num_experts, block_m)
    assert sorted_slots.numel() == size  # a bound from T, k, E, BLOCK_M only
    slots, blocks = expected_layout(ref_ids, num_experts, block_m, size)
    assert sorted_slots.tolist() == slots
    assert block_expert.tolist() == blocks


DESIGNS = {
    "plain": config(),
    "swap_ab_both": config(swap1=True, swap2=True),
    "swap_ab_gemm2_m32": config(swap2=True, block_m=32),
    "split_k_2": config(split=2),
    "split_k_4_swap": config(split=4, swap2=True),  # I = 45: 16-wide splits, 3 of them non-empty
    "fused_routing": config(fused=True),
    "all": config(fused=True, swap1=True, swap2=True, split=3),
}


@pytest.mark.parametrize("design", sorted(DESIGNS))
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k",
    [(1, 4, 2), (37, 3, 1), (21, 1, 1)],
    ids=["T1_k2", "T37_k1", "E1"],
)
def test_design_matches_float64_reference(design, num_tokens, num_experts, top_k):
    from fastdume.kernels.moe_grouped import forward

    torch.manual_seed(11)
    x = torch.randn(num_tokens, 40)
    weight, bias = make_router(num_experts, 40, "uniform")
    gate_up, down = make_experts(num_experts, 40, 45)
    with poisoned():
        got = forward(x, weight, bias, gate_up, down, top_k, 1.0, DESIGNS[design])
    ref_w, ref_ids = moe.route_torch(x, weight, bias, top_k, 1.0)
    want = dense_reference(x, ref_w, ref_ids, gate_up, down)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_k_and_swap_ab_half_precision(dtype):
    from fastdume.kernels.moe_grouped import forward

    torch.manual_seed(12)
    x = torch.randn(19, 48).to(dtype)
    weight, bias = make_router(3, 48, "skewed")
    gate_up, down = make_experts(3, 48, 64, dtype)
    with poisoned():
        got = forward(x, weight, bias, gate_up, down, 2, 1.0, DESIGNS["all"])
    w, ids = moe.route_torch(x, weight, bias, 2, 1.0)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(got.double(), dense_reference(x, w, ids, gate_up, down),
                               rtol=tol, atol=tol)  # fmt: skip


def test_split_k_is_deterministic():
    """Partials are summed in a fixed order (no atomics): the same bits on every run. (Batch
    invariance is a GPU test: the interpreter's numpy matmul may block by the tile's rows.)"""
    from fastdume.kernels.moe_grouped import forward

    torch.manual_seed(13)
    x = torch.randn(12, 40)
    weight, bias = make_router(4, 40, "uniform")
    gate_up, down = make_experts(4, 40, 70)
    cfg = config(split=3, swap2=True)
    runs = [forward(x, weight, bias, gate_up, down, 2, 1.0, cfg) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_fused_moe_runs_the_chosen_design_with_gradients(monkeypatch):
    """Through ops: one config chosen per call (here FUSED_ROUTING + swap-AB + split-K), the
    aligned layout handed to the custom op, gradients as autograd through the torch path."""
    chosen = config(fused=True, swap1=True, swap2=True, split=2)
    calls = []
    monkeypatch.setattr(moe_configs, "interpreter_config",
                        lambda: calls.append(1) or copy.deepcopy(chosen))  # fmt: skip
    torch.manual_seed(14)
    x = torch.randn(23, 33)
    weight, bias = make_router(4, 33, "uniform")
    gate_up, down = make_experts(4, 33, 40)
    grad_out = torch.randn(23, 33)

    def run(backend):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, gate_up, down)]
        out = moe.fused_moe(*leaves, top_k=2, temperature=0.7, backend=backend)
        return [out, *torch.autograd.grad(out, leaves, grad_out)]

    got = run("triton")
    assert calls == [1]  # chosen once for routing, alignment and both GEMMs
    for g, w in zip(got, run("torch"), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_old_configs_keep_their_meaning_and_bad_keys_raise():
    plain = {"BLOCK_M": 16, "gemm1": dict(TILE), "gemm2": dict(TILE)}
    full = moe_configs.validate(plain, "old")
    assert full["FUSED_ROUTING"] is False and full["gemm2"]["SPLIT_K"] == 1
    assert full["gemm1"]["SWAP_AB"] is False and full["gemm2"]["SWAP_AB"] is False
    assert plain == {"BLOCK_M": 16, "gemm1": TILE, "gemm2": TILE}  # the input is not changed
    for name, *_, shipped in moe_configs.all_shipped():
        assert not shipped["FUSED_ROUTING"] and shipped["gemm2"]["SPLIT_K"] == 1, name
    bad = [
        ({**plain, "gemm2": {**TILE, "SPLIT_K": 0}}, "SPLIT_K"),
        ({**plain, "gemm2": {**TILE, "SPLIT_K": 2.0}}, "SPLIT_K"),
        ({**plain, "gemm1": {**TILE, "SWAP_AB": "yes"}}, "SWAP_AB"),
        ({**plain, "FUSED_ROUTING": 1}, "FUSED_ROUTING"),
        ({**plain, "gemm1": {**TILE, "SPLITK": 2}}, "unknown keys"),
        ({**plain, "SPLIT_K": 2}, "unknown keys"),
    ]
    for cfg, match in bad:
        with pytest.raises(ValueError, match=match):
            moe_configs.validate(cfg, "bad")


def test_autotune_search_space_has_the_designs():
    routed = moe_configs.candidates()
    assert any(c["FUSED_ROUTING"] for c in routed)
    assert any(c["gemm2"]["SPLIT_K"] > 1 for c in routed)
    assert any(c["gemm1"]["SWAP_AB"] and c["gemm2"]["SWAP_AB"] for c in routed)
    assert all(not c["FUSED_ROUTING"] for c in moe_configs.candidates(routed=False))
    # the designs are offered for small-token tiles only; the plain configs are all still there
    assert all(
        c["BLOCK_M"] < 64
        for c in routed
        if c != moe_configs.validate(c, "x")
        or c["FUSED_ROUTING"]
        or c["gemm1"]["SWAP_AB"]
        or c["gemm2"]["SPLIT_K"] > 1
    )
    plain = {moe_configs.json.dumps(c, sort_keys=True) for *_, c in moe_configs.all_shipped()}
    assert plain <= {moe_configs.json.dumps(c, sort_keys=True) for c in routed}


def _tuner():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
    import tune_moe

    return tune_moe


@pytest.mark.parametrize("num_tokens", [1, 128, 1024])
def test_tuner_picks_a_design_only_where_it_is_faster(num_tokens):
    """benches/tune_moe.search with synthetic timings: designs that cost more are never kept;
    designs that cost less are kept where the token class offers them."""
    tune = _tuner()
    base = moe_configs.get_config(4, 3072, 8192, torch.bfloat16, None, num_tokens)

    def cost(cfg, gain):
        t = 100.0 + cfg["gemm1"]["BLOCK_N"] / 64 + cfg["gemm2"]["num_stages"] / 8
        t -= gain * cfg["gemm1"]["SWAP_AB"] + gain * cfg["gemm2"]["SWAP_AB"]
        t -= gain * (cfg["gemm2"]["SPLIT_K"] == 4) + gain * cfg["FUSED_ROUTING"]
        return t

    seen = []
    slower, _ = tune.search(num_tokens, base, lambda c: seen.append(c) or cost(c, -1.0))
    assert moe_configs.validate(slower, "tuned") == slower
    assert not slower["FUSED_ROUTING"] and slower["gemm2"]["SPLIT_K"] == 1
    assert not slower["gemm1"]["SWAP_AB"] and not slower["gemm2"]["SWAP_AB"]
    faster, _ = tune.search(num_tokens, base, lambda c: cost(c, 1.0))
    small_m = faster["BLOCK_M"] < 64
    assert faster["gemm1"]["SWAP_AB"] == faster["gemm2"]["SWAP_AB"] == small_m
    assert (faster["gemm2"]["SPLIT_K"] == 4) == (num_tokens <= tune.SPLIT_MAX_T)
    assert faster["FUSED_ROUTING"] == (num_tokens <= tune.FUSED_MAX_T)
    # every GEMM variant the search times is one that compile_configs pre-compiles
    compiled = [moe_configs.validate(c, "x") for c in tune.compile_configs(num_tokens, base)]
    for which in ("gemm1", "gemm2"):
        pairs = {(c["BLOCK_M"], json_key({**c[which], "SPLIT_K": 0})) for c in compiled}
        assert {(c["BLOCK_M"], json_key({**c[which], "SPLIT_K": 0})) for c in seen} <= pairs
    assert any(c["FUSED_ROUTING"] for c in compiled) == (num_tokens <= tune.FUSED_MAX_T)


def json_key(config):
    return moe_configs.json.dumps(config, sort_keys=True)


def test_custom_op_with_config_and_layout_passes_opcheck():
    """The op's new arguments (a config string, the fused dispatch's layout) keep its schema,
    fake implementation and autograd registration valid."""
    from fastdume.kernels.moe_routing import route_align

    from fastdume.ops import moe_triton

    torch.manual_seed(15)
    x = torch.randn(6, 17)
    weight, bias = make_router(3, 17, "uniform")
    w, ids, sorted_slots, block_expert = route_align(x, weight, bias, 2, 1.0, 16)
    gate_up = (torch.randn(3, 2 * 9, 17) / 4).requires_grad_()
    down = (torch.randn(3, 17, 9) / 3).requires_grad_()
    cfg = moe_configs.json.dumps(config(fused=True, split=2))
    args = (x.requires_grad_(), w.requires_grad_(), ids, gate_up, down, cfg, sorted_slots,
            block_expert)  # fmt: skip
    torch.library.opcheck(
        torch.ops.fastdume.moe_experts.default, args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )  # fmt: skip
    got = moe_triton.experts(x, w, ids, gate_up, down, config(), (sorted_slots, block_expert))
    torch.testing.assert_close(got.double(), dense_reference(x, w, ids, gate_up, down),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("design", ["swap_ab_both", "split_k_4_swap", "fused_routing", "all"])
def test_gpu_design_bf16_and_cuda_graph(design):
    """Each design on a real device (bf16, wgmma where swapped), and captured in a CUDA graph:
    no host sync anywhere on the path, replays follow new inputs."""
    from fastdume.kernels.moe_grouped import forward

    torch.manual_seed(16)
    dev = torch.device("cuda")
    cfg = {**DESIGNS[design], "gemm1": {**DESIGNS[design]["gemm1"], "BLOCK_N": 64, "BLOCK_K": 64},
           "gemm2": {**DESIGNS[design]["gemm2"], "BLOCK_N": 64, "BLOCK_K": 64}}  # fmt: skip
    x = torch.randn(5, 512, device=dev, dtype=torch.bfloat16)
    weight, bias = (t.to(dev) for t in make_router(4, 512, "uniform"))
    gate_up, down = (t.to(dev) for t in make_experts(4, 512, 768, torch.bfloat16))
    run = lambda: forward(x, weight, bias, gate_up, down, 2, 1.0, cfg)  # noqa: E731
    want = moe.fused_moe(x, weight, bias, gate_up, down, top_k=2, backend="torch")
    torch.testing.assert_close(run(), want, rtol=2e-2, atol=2e-2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    x.copy_(torch.randn_like(x))
    graph.replay()
    want = moe.fused_moe(x, weight, bias, gate_up, down, top_k=2, backend="torch")
    torch.testing.assert_close(captured, want, rtol=2e-2, atol=2e-2)
