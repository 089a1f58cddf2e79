"""fastdume.moe.fused_moe speed, with its baselines measured in the same run.

CPU (2/9 target): E 5, k 1, H 768, I 3072, T 2048, bf16 and fp32 on the torch path, against the
reference's dense loop over all experts and against one dense MLP on the same tokens; target
fused_moe <= 1.15x the dense MLP. Plus the CLM shape at small T.
GPU (3/9, marked `gpu`): the issue's shapes and T in {1, 16, 128, 1024, 4096} on the Triton path
against the torch path, transformers' grouped_mm experts implementation and the dense loop;
extra_info has time, TB/s (bytes of the distinct active experts' weights / time) and TFLOP/s,
eager (host launch overhead included) and under CUDA graph replay (GPU time), with the memory
floor taken from a device-to-device copy measured in the same run.
Backward on the Triton path is torch ops (fastdume/ops/moe_triton.py), not kernels: these benches
time the forward only.

Smoke run (--benchmark-disable): the CPU target at T 64, small batches up to T 16, one
repetition each.
"""

import functools
import time
import types

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.moe import grouped_mm_experts_forward

from fastdume.ops import moe

CLM = (5, 768, 3072)  # E, H, I of the paper's CLM experts
GPU_SHAPES = {"clm_k1": (5, 768, 3072, 1), "llama3b_k1": (4, 3072, 8192, 1),
              "llama3b_k2": (4, 3072, 8192, 2), "mixtral_k2": (8, 4096, 14336, 2)}  # fmt: skip


def make(num_tokens, num_experts, hidden, inter, dtype, device="cpu"):
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(num_tokens, hidden, generator=g).to(device, dtype)
    return (x, *make_weights(num_experts, hidden, inter, dtype, device))


@functools.cache
def make_weights(num_experts, hidden, inter, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    router_w = torch.randn(num_experts, hidden, generator=g).to(device)
    router_b = torch.randn(num_experts, generator=g).to(device)
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(
        device, dtype
    )
    down = (torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5).to(device, dtype)
    return router_w, router_b, gate_up, down


def dense_mlp(x, gate_up, down):
    """One dense SwiGLU MLP (expert 0's weights) on every token: the cost floor of k = 1."""
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T


def dense_loop(x, router_w, router_b, gate_up, down, top_k):
    """The reference forward: every expert on every token, times a mostly-zero weight."""
    weights, ids = moe.route_torch(x, router_w, router_b, top_k, 1.0)
    full = torch.zeros(x.shape[0], gate_up.shape[0], device=x.device)
    full.scatter_(1, ids, weights)
    out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    for e in range(gate_up.shape[0]):
        out += full[:, e : e + 1] * dense_mlp(x, gate_up[e], down[e]).float()
    return out.to(x.dtype)


def hf_grouped_mm(x, router_w, router_b, gate_up, down, top_k):
    weights, ids = moe.route_torch(x, router_w, router_b, top_k, 1.0)
    experts = types.SimpleNamespace(
        num_experts=gate_up.shape[0], has_gate=True, has_bias=False, is_transposed=False,
        has_post_expert_norm=False, _is_expert_parallel=False, gate_up_proj=gate_up,
        down_proj=down, _apply_gate=lambda gu: F.silu(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1],
    )  # fmt: skip
    return grouped_mm_experts_forward(experts, x, ids, weights.to(x.dtype))


def graph_seconds(fn, repeat):
    """Seconds per replay of `fn` captured in a CUDA graph: GPU time without the host's launch
    overhead, as a decode loop under graphs runs (vLLM, SGLang, torch.compile's cudagraphs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside capture: compiles kernels, fills the allocator's pool
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


@functools.cache
def copy_bandwidth():
    """Bytes/s (read + written) of a 1 GiB device-to-device copy: the memory floor's peak."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = seconds(lambda: dst.copy_(src), 10, torch.cuda.synchronize)
    return 2 * src.numel() / t


def seconds(fn, repeat, sync=lambda: None):
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cpu_moe_vs_dense_mlp(benchmark, dtype):
    """2/9 target on the CPU: fused_moe (torch path) <= 1.15x one dense MLP, E 5, k 1."""
    num_tokens = 64 if benchmark.disabled else 2048
    repeat = 1 if benchmark.disabled else 3
    x, rw, rb, gu, dn = make(num_tokens, *CLM, dtype)
    run = lambda: moe.fused_moe(x, rw, rb, gu, dn, top_k=1, backend="torch")
    out = benchmark(run)
    want = dense_loop(x, rw, rb, gu, dn, 1)
    torch.testing.assert_close(out.float(), want.float(), rtol=3e-2, atol=3e-2)
    t_moe = seconds(run, repeat)
    t_mlp = seconds(lambda: dense_mlp(x, gu[0], dn[0]), repeat)
    t_loop = seconds(lambda: dense_loop(x, rw, rb, gu, dn, 1), 1)
    benchmark.extra_info.update(
        tokens=num_tokens, fused_moe_ms=t_moe * 1e3, dense_mlp_ms=t_mlp * 1e3,
        dense_loop_ms=t_loop * 1e3, ratio_vs_dense_mlp=t_moe / t_mlp,
        speedup_vs_dense_loop=t_loop / t_moe, target_ratio_vs_dense_mlp=1.15,
    )  # fmt: skip


@pytest.mark.parametrize("num_tokens", [1, 16, 128])
@pytest.mark.parametrize("top_k", [1, 2])
def test_cpu_small_batches(benchmark, num_tokens, top_k):
    """The CLM shape at decode-like T on the torch path, vs the dense loop (bf16)."""
    if benchmark.disabled and num_tokens > 16:
        pytest.skip("smoke run: T 128 only in timed runs")
    x, rw, rb, gu, dn = make(num_tokens, *CLM, torch.bfloat16)
    run = lambda: moe.fused_moe(x, rw, rb, gu, dn, top_k=top_k, backend="torch")
    benchmark(run)
    repeat = 1 if benchmark.disabled else 5
    t_moe = seconds(run, repeat)
    t_loop = seconds(lambda: dense_loop(x, rw, rb, gu, dn, top_k), repeat)
    benchmark.extra_info.update(
        fused_moe_ms=t_moe * 1e3, dense_loop_ms=t_loop * 1e3, speedup_vs_dense_loop=t_loop / t_moe
    )


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 128, 1024, 4096])
@pytest.mark.parametrize("shape", sorted(GPU_SHAPES))
def test_gpu_fused_moe(benchmark, shape, num_tokens):
    num_experts, hidden, inter, top_k = GPU_SHAPES[shape]
    x, rw, rb, gu, dn = make(num_tokens, num_experts, hidden, inter, torch.bfloat16, "cuda")
    sync = torch.cuda.synchronize
    run = lambda: moe.fused_moe(x, rw, rb, gu, dn, top_k=top_k, backend="triton")
    benchmark.pedantic(run, setup=sync, rounds=20, warmup_rounds=3)
    _, ids = moe.route(x, rw, rb, top_k)
    active = torch.unique(ids).numel()
    weight_bytes = active * 3 * hidden * inter * x.element_size()
    flops = 2 * num_tokens * top_k * 3 * hidden * inter
    t = seconds(run, 20, sync)
    base = {
        "torch_path": lambda: moe.fused_moe(x, rw, rb, gu, dn, top_k=top_k, backend="torch"),
        "hf_grouped_mm": lambda: hf_grouped_mm(x, rw, rb, gu, dn, top_k),
    }
    if num_tokens <= 1024:
        base["dense_loop"] = lambda: dense_loop(x, rw, rb, gu, dn, top_k)
    times = {name: seconds(fn, 5, sync) for name, fn in base.items()}
    # A dense bf16 GEMM with the same FLOPs: [T*k, H] x [H, 3I].
    a = torch.randn(num_tokens * top_k, hidden, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(hidden, 3 * inter, device="cuda", dtype=torch.bfloat16)
    t_gemm = seconds(lambda: a @ b, 20, sync)
    # GPU time under CUDA graphs, the launch overhead of the host removed for every contender.
    g = graph_seconds(run, 50)
    try:
        g_hf = graph_seconds(base["hf_grouped_mm"], 50)
    except RuntimeError:  # not capturable in this transformers release: no graph number for it
        g_hf = float("nan")
    g_gemm = graph_seconds(lambda: a @ b, 50)
    floor = weight_bytes / copy_bandwidth()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), fused_moe_us=t * 1e6,
        tb_per_s=weight_bytes / t / 1e12, tflop_per_s=flops / t / 1e12,
        bandwidth_floor_share=floor / t, dense_gemm_share=t_gemm / t,
        **{f"{k}_us": v * 1e6 for k, v in times.items()},
        **{f"speedup_vs_{k}": v / t for k, v in times.items()},
        copy_tb_per_s=copy_bandwidth() / 1e12, graph_us=g * 1e6, graph_hf_grouped_mm_us=g_hf * 1e6,
        graph_dense_gemm_us=g_gemm * 1e6, graph_bandwidth_floor_share=floor / g,
        graph_dense_gemm_share=g_gemm / g, graph_speedup_vs_hf_grouped_mm=g_hf / g,
    )  # fmt: skip


def design_variant(config, design):
    """`config` with one design option of fastdume/ops/moe_configs switched on."""
    if design == "swap_ab":  # the weight side must fill a wgmma M of 64
        swap = lambda g: {**g, "SWAP_AB": True, "BLOCK_N": max(64, g["BLOCK_N"])}  # noqa: E731
        return {**config, "gemm1": swap(config["gemm1"]), "gemm2": swap(config["gemm2"])}
    if design == "split_k":
        return {**config, "gemm2": {**config["gemm2"], "SPLIT_K": 4}}
    return {**config, "FUSED_ROUTING": True}


DESIGNS = ("swap_ab", "split_k", "fused_routing")


def _design_case(benchmark, x, rw, rb, gu, dn, top_k, design):
    """The shipped config against the same config with `design` on, same inputs, same run."""
    from fastdume.ops import _backend, moe_triton

    kern = _backend.kernels("moe_grouped", x.device)
    base = moe_triton.choose_config(x, gu, dn, top_k, router=(rw, rb, 1.0))
    variant = design_variant(base, design)
    run = lambda cfg: kern.forward(x, rw, rb, gu, dn, top_k, 1.0, cfg)  # noqa: E731
    out = benchmark(run, variant)
    want = moe.fused_moe(x, rw, rb, gu, dn, top_k=top_k, backend="torch")
    torch.testing.assert_close(out.float(), want.float(), rtol=3e-2, atol=3e-2)
    return base, variant, run


@pytest.mark.parametrize("design", DESIGNS)
def test_cpu_design_smoke(benchmark, design):
    """Each design option's bench path under the Triton interpreter, tiny shape: checks the
    result; interpreter times say nothing about a GPU, so no ratio is reported here."""
    x, rw, rb, gu, dn = make(5, 3, 32, 48, torch.float32)
    _design_case(benchmark, x, rw, rb, gu, dn, 2, design)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 128])
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("shape", sorted(GPU_SHAPES))
def test_gpu_design(benchmark, shape, design, num_tokens):
    """Design option vs the shipped config for this card (plain design where no tuned file has
    the option yet): GPU time under CUDA graphs and eager wall time; ratio > 1 = option faster."""
    num_experts, hidden, inter, top_k = GPU_SHAPES[shape]
    x, rw, rb, gu, dn = make(num_tokens, num_experts, hidden, inter, torch.bfloat16, "cuda")
    base, variant, run = _design_case(benchmark, x, rw, rb, gu, dn, top_k, design)
    sync = torch.cuda.synchronize
    t_base, t_var = seconds(lambda: run(base), 20, sync), seconds(lambda: run(variant), 20, sync)
    g_base, g_var = graph_seconds(lambda: run(base), 50), graph_seconds(lambda: run(variant), 50)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), base_config=base, design_config=variant,
        base_us=t_base * 1e6, design_us=t_var * 1e6, speedup=t_base / t_var,
        graph_base_us=g_base * 1e6, graph_design_us=g_var * 1e6, graph_speedup=g_base / g_var,
    )  # fmt: skip
