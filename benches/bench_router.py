"""Router statistics accumulation: RouterStats.update vs the reference method, and its error.

Reference (public DUME code): z = [x, 1] concatenated in fp32, A += z^T z (full), B += z^T Y
with a one-hot Y. Ours: fp32 products of the lower triangle only, added into an fp64 store,
column sum and count instead of the ones column and Y. Same run, same tokens, ratio of
tokens/s in extra_info. With --benchmark-disable (CI smoke) the sizes shrink to a few seconds.
"""

import time

import pytest
import torch

from fastdume.ops.gram import gram_accumulate, symmetrize
from fastdume.router import RouterStats

NUM_EXPERTS = 5


def reference_update(A, B, x, expert):
    z = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    y = torch.zeros(x.shape[0], NUM_EXPERTS, dtype=x.dtype)
    y[:, expert] = 1.0
    A += z.T @ z
    B += z.T @ y


def best_seconds(fns, reps):
    """Best time of each function, calls interleaved so both see the same machine load."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@pytest.mark.parametrize("hidden", [768, 3072])
def test_stats_accumulation_vs_reference(benchmark, hidden):
    smoke = benchmark.disabled
    tokens = (512 if smoke else 4096) if hidden == 768 else (256 if smoke else 2048)
    batches = 1 if smoke else 4
    xs = [torch.randn(tokens, hidden) for _ in range(batches)]
    A = torch.zeros(hidden + 1, hidden + 1)
    B = torch.zeros(hidden + 1, NUM_EXPERTS)
    stats = RouterStats(1, hidden, ["a"])

    def ours():
        for x in xs:
            stats.update(0, x, "a")

    def reference():
        for x in xs:
            reference_update(A, B, x, 2)

    def full_product():  # the reference's GEMM alone: a perfect SYRK would take half this time
        for x in xs:
            x.T @ x

    reps = 1 if smoke else 3
    ref_s, ours_s, full_s = best_seconds([reference, ours, full_product], reps)
    benchmark.pedantic(ours, rounds=reps, iterations=1)
    n = tokens * batches
    benchmark.extra_info.update(
        hidden=hidden,
        tokens_per_call=n,
        ours_tokens_per_s=round(n / ours_s),
        reference_tokens_per_s=round(n / ref_s),
        speedup_vs_reference=round(ref_s / ours_s, 2),
        # ceiling for any triangle-only method on this BLAS: 2 x this
        full_product_speedup_vs_reference=round(ref_s / full_s, 2),
        threads=torch.get_num_threads(),
    )
    # Same statistics as the reference (its A holds G, s and n), checked on one fresh pass.
    A.zero_()
    stats = RouterStats(1, hidden, ["a"])
    reference_update(A, B, xs[0], 2)
    stats.update(0, xs[0], "a")
    full = stats.gram("a")[0]
    assert float((full - A[:hidden, :hidden].double()).abs().max()) < 1e-4 * float(full.max())
    assert float((stats.colsum("a")[0] - A[hidden, :hidden].double()).abs().max()) < 1e-2
    assert stats.tokens("a") == int(A[hidden, hidden]) == tokens


def heavy_tailed(n, hidden, g):
    scale = torch.exp(0.5 * torch.randn(hidden, generator=g))
    scale[:2] *= 40.0  # two 'massive activation' channels, as in trained LLMs
    mean = 0.3 * torch.randn(hidden, generator=g)
    chi2 = torch.distributions.Gamma(2.0, 0.5).sample((n, 1))
    return (mean + scale * torch.randn(n, hidden, generator=g) / torch.sqrt(chi2 / 4)).float()


def test_accumulation_error_on_heavy_tailed_hidden_states(benchmark):
    """Error of the stored Gram matrix vs exact (fp64 products), relative to sqrt(G_ii G_jj):
    ours (fp32 products, fp64 store) and an all-fp32 accumulation like the reference's.
    Full run: 10M tokens (H 64, 8192-token batches); smoke run: 200k."""
    tokens = 200_000 if benchmark.disabled else 10_000_000
    hidden, chunk = 64, 8192
    g = torch.Generator().manual_seed(0)
    ours = RouterStats(1, hidden, ["a"])
    g32, s32 = torch.zeros(hidden, hidden), torch.zeros(hidden)
    exact = torch.zeros(hidden, hidden, dtype=torch.float64)

    def run():
        done = 0
        while done < tokens:
            x = heavy_tailed(min(chunk, tokens - done), hidden, g)
            done += x.shape[0]
            ours.update(0, x, "a")
            gram_accumulate(x, g32, s32, precision="fp32")
            exact.add_(x.double().T @ x.double())

    benchmark.pedantic(run, rounds=1, iterations=1)
    diag = exact.diagonal().sqrt()
    norm = diag[:, None] * diag[None, :]
    err_ours = float(((ours.gram("a")[0] - exact).abs() / norm).max())
    err_fp32 = float(((symmetrize(g32).double() - exact).abs() / norm).max())
    benchmark.extra_info.update(
        tokens=tokens,
        max_rel_error_fp64_store=err_ours,
        max_rel_error_fp32_store=err_fp32,
    )
    print(f"\n{tokens} tokens: fp64 store {err_ours:.2e}, fp32 store {err_fp32:.2e}")
    assert err_ours < 2e-6
