"""fastdume.ops.grouped_linear speed: each token through its expert's weight, against one dense
linear of the same [T, K] x [K, N] shape measured in the same run (the cost floor: a routed-model
projection cannot do less work than the dense model's).

CPU (torch path, fp32; bf16 for q/k/v): the SmolLM2-135M projections (K 576; N 576+2*192 fused
q/k/v with GQA, 576 o, 49152 LM head) at T 2048, E 4, with tokens routed uniformly at random
(the worst case for the row gather and scatter) and in contiguous runs (what context routing
tends to give). Grouped and dense are timed alternately, so load on the machine hits both. Also
the per-token gathers: the embedding rows against a dense embedding lookup, and a norm weight
applied per token (x * gather_vectors) against the dense model's broadcast multiply.
GPU (marked `gpu`): SmolLM2-135M and a Llama-1B-like model (K 2048; N 2048+2*512 q/k/v with GQA,
2048 o, 128256 LM head), E 4, bf16, T in {1, 16, 128, 1024, 4096}: the Triton path against the
dense cuBLAS linear and the torch path; extra_info has the time eagerly and under CUDA graph
replay, TB/s (bytes of the active experts' weights / time) and TFLOP/s. The gathers against torch
indexing on a dense table (whether a Triton gather would have anything to win).

Smoke run (--benchmark-disable): T 64, one repetition each.
"""

import functools
import time

import pytest
import torch
import torch.nn.functional as F

from fastdume.ops import grouped_linear as gl

NUM_EXPERTS = 4
# name: (K, N); SmolLM2-135M has 9 query and 3 key/value heads of 64, Llama-3.2-1B 32 and 8.
SMOLLM2 = {"qkv": (576, 576 + 2 * 192), "o": (576, 576), "lm_head": (576, 49152)}
LLAMA_1B = {"qkv": (2048, 2048 + 2 * 512), "o": (2048, 2048), "lm_head": (2048, 128256)}
GPU_SHAPES = {**{f"smollm2_{k}": v for k, v in SMOLLM2.items()},
              **{f"llama1b_{k}": v for k, v in LLAMA_1B.items()}}  # fmt: skip


@functools.cache
def weights(k, n, dtype, device):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(NUM_EXPERTS, n, k, generator=g) / k**0.5).to(device, dtype)


def inputs(num_tokens, k, routing, dtype, device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, k, generator=g).to(device, dtype)
    if routing == "uniform":
        ids = torch.randint(0, NUM_EXPERTS, (num_tokens,), generator=g)
    else:  # four contiguous runs, as four sequences of one domain each
        ids = torch.arange(num_tokens) * NUM_EXPERTS // max(num_tokens, 1)
    return x, ids.to(device)


def seconds(fn, repeat, sync=lambda: None):
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def alternate(fns, repeat):
    """Median seconds of each fn, timed in turn `repeat` times: drift on a shared machine
    slows them alike instead of whichever ran during it."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


@pytest.mark.parametrize("routing", ["uniform", "runs"])
@pytest.mark.parametrize(
    "proj,dtype",
    [("qkv", torch.float32), ("o", torch.float32), ("lm_head", torch.float32),
     ("qkv", torch.bfloat16)],
    ids=["qkv-fp32", "o-fp32", "lm_head-fp32", "qkv-bf16"],
)  # fmt: skip
def test_cpu_grouped_linear_vs_dense(benchmark, proj, dtype, routing):
    num_tokens = 64 if benchmark.disabled else 2048
    repeat = 1 if benchmark.disabled else 5
    k, n = SMOLLM2[proj]
    w = weights(k, n, dtype, "cpu")
    x, ids = inputs(num_tokens, k, routing, dtype)
    run = lambda: gl.grouped_linear(x, w, ids, backend="torch", check_ids=False)
    dense = lambda: F.linear(x, w[0])
    out = benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3)
    rows = ids == 1
    torch.testing.assert_close(out[rows], F.linear(x[rows], w[1]))
    t_grouped, t_dense = alternate([run, dense], repeat)
    benchmark.extra_info.update(
        tokens=num_tokens, K=k, N=n, grouped_ms=t_grouped * 1e3, dense_ms=t_dense * 1e3,
        ratio_vs_dense=t_grouped / t_dense,
    )  # fmt: skip


def test_cpu_gathers_vs_dense(benchmark):
    """Embedding rows per (expert, token) vs one dense lookup; a per-token norm weight vs the
    dense broadcast. SmolLM2's vocabulary and width, fp32, uniform routing."""
    num_tokens = 64 if benchmark.disabled else 2048
    repeat = 1 if benchmark.disabled else 20
    k, vocab = SMOLLM2["lm_head"]
    table = weights(k, vocab, torch.float32, "cpu")  # [E, V, H]
    norms = table[:, 0]
    x, ids = inputs(num_tokens, k, "uniform", torch.float32)
    tokens = torch.randint(0, vocab, (num_tokens,), generator=torch.Generator().manual_seed(2))
    rows = lambda: gl.gather_rows(table, ids, tokens)
    out = benchmark.pedantic(rows, rounds=1 if benchmark.disabled else 5)
    assert torch.equal(out[ids == 2], table[2, tokens[ids == 2]])
    fns = [rows, lambda: F.embedding(tokens, table[0]),
           lambda: x * gl.gather_vectors(norms, ids), lambda: x * norms[0]]  # fmt: skip
    t_rows, t_emb, t_norm, t_bcast = alternate(fns, repeat)
    benchmark.extra_info.update(
        gather_rows_us=t_rows * 1e6, dense_embedding_us=t_emb * 1e6,
        rows_ratio_vs_dense=t_rows / t_emb, per_token_norm_us=t_norm * 1e6,
        dense_norm_us=t_bcast * 1e6, norm_ratio_vs_dense=t_norm / t_bcast,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 128, 1024, 4096])
@pytest.mark.parametrize("shape", sorted(GPU_SHAPES))
def test_gpu_grouped_linear(benchmark, shape, num_tokens):
    from bench_moe import graph_seconds

    k, n = GPU_SHAPES[shape]
    w = weights(k, n, torch.bfloat16, "cuda")
    x, ids = inputs(num_tokens, k, "uniform", torch.bfloat16, "cuda")
    sync = torch.cuda.synchronize
    run = lambda: gl.grouped_linear(x, w, ids, backend="triton", check_ids=False)
    torch_path = lambda: gl.grouped_linear(x, w, ids, backend="torch", check_ids=False)
    dense = lambda: F.linear(x, w[0])
    out = benchmark.pedantic(run, setup=sync, rounds=10, warmup_rounds=2)
    torch.testing.assert_close(out, torch_path())
    t, t_torch, t_dense = (seconds(fn, 10, sync) for fn in (run, torch_path, dense))
    g, g_dense = graph_seconds(run, 20), graph_seconds(dense, 20)
    active = torch.unique(ids).numel()
    weight_bytes = active * n * k * 2
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), grouped_us=t * 1e6, torch_path_us=t_torch * 1e6,
        dense_us=t_dense * 1e6, ratio_vs_dense=t / t_dense, speedup_vs_torch_path=t_torch / t,
        graph_us=g * 1e6, graph_dense_us=g_dense * 1e6, graph_ratio_vs_dense=g / g_dense,
        tb_per_s=weight_bytes / g / 1e12, tflop_per_s=2 * num_tokens * n * k / g / 1e12,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["smollm2", "llama1b"])
def test_gpu_gathers(benchmark, model):
    """gather_rows / gather_vectors (torch indexing) at T 4096 against the same lookups in one
    dense table: a ratio near 1 leaves a Triton gather nothing to win."""
    k, vocab = {"smollm2": SMOLLM2, "llama1b": LLAMA_1B}[model]["lm_head"]
    table = weights(k, vocab, torch.bfloat16, "cuda")
    norms = table[:, 0].contiguous()
    x, ids = inputs(4096, k, "uniform", torch.bfloat16, "cuda")
    tokens = torch.randint(0, vocab, (4096,), device="cuda")
    sync = torch.cuda.synchronize
    rows = lambda: gl.gather_rows(table, ids, tokens, check_ids=False)
    benchmark.pedantic(rows, setup=sync, rounds=10, warmup_rounds=2)
    norm = lambda: x * gl.gather_vectors(norms, ids, check_ids=False)
    fns = [rows, lambda: F.embedding(tokens, table[0]), norm, lambda: x * norms[0]]
    t_rows, t_emb, t_norm, t_bcast = (seconds(fn, 50, sync) for fn in fns)
    benchmark.extra_info.update(
        gather_rows_us=t_rows * 1e6, dense_embedding_us=t_emb * 1e6,
        rows_ratio_vs_dense=t_rows / t_emb, per_token_norm_us=t_norm * 1e6,
        dense_norm_us=t_bcast * 1e6, norm_ratio_vs_dense=t_norm / t_bcast,
    )  # fmt: skip
