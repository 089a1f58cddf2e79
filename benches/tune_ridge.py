"""Time Gram-kernel launch configs and inspect the batched solver on this GPU (prints a table).

    python benches/tune_ridge.py

Gram: bf16 hidden states, 65536 tokens, H in {768, 3072, 4096}, one layer, each config of a small
grid against torch's bf16 X^T X in the same run. Solver: for (1000, 65) the share of matrices whose
fp32 factor failed (info) or whose refinement stalled above the float64 fallback threshold.
"""

import itertools

import torch
import triton.testing

from fastdume.ops import gram, ridge

GRID = [
    {"block_h": h, "block_n": n, "split_k": None, "num_warps": w, "num_stages": s}
    for h, n, w, s in itertools.product((64, 128), (64, 128), (4, 8), (3, 4))
]


def gram_table():
    for hidden in (768, 3072, 4096):
        x = torch.randn(1, 65536, hidden, device="cuda").to(torch.bfloat16)
        g = torch.zeros(1, hidden, hidden, device="cuda")
        s = torch.zeros(1, hidden, device="cuda")
        t_full = triton.testing.do_bench(lambda: x[0].T @ x[0])  # noqa: B023
        rows = []
        for cfg in GRID:
            tiles = -(-hidden // cfg["block_h"])
            auto = gram._config(x, False, tiles * (tiles + 1) // 2)
            cfg = {**cfg, "split_k": auto["split_k"]}
            try:
                ms = triton.testing.do_bench(
                    lambda: gram.gram_accumulate_triton(x, g, s, config=cfg)  # noqa: B023
                )
            except Exception as exc:  # shared memory or registers exceeded
                print(f"H={hidden} {cfg}: {type(exc).__name__}")
                continue
            rows.append((ms, cfg))
        rows.sort(key=lambda r: r[0])
        for ms, cfg in rows[:4]:
            print(f"H={hidden} {ms * 1e3:8.1f} us  vs bf16 full {t_full / ms:.2f}x  {cfg}")


def solver_report():
    torch.manual_seed(0)
    x = torch.randn(1000, 130, 65, dtype=torch.float64, device="cuda")
    A = x.mT @ x / 130
    B = torch.randn(1000, 65, 8, dtype=torch.float64, device="cuda")
    calls = []
    original = ridge.ridge_solve_torch
    ridge.ridge_solve_torch = lambda a, b, lam: calls.append(a.shape[0]) or original(a, b, lam)
    try:
        ridge.ridge_solve(A, B, 1e-2, backend="triton")
        ms = triton.testing.do_bench(lambda: ridge.ridge_solve(A, B, 1e-2, backend="triton"))
    finally:
        ridge.ridge_solve_torch = original
    M = A + 1e-2 * torch.eye(65, dtype=torch.float64, device="cuda")
    chol = triton.testing.do_bench(lambda: torch.cholesky_solve(B, torch.linalg.cholesky(M)))
    print(f"solve (1000, 65): {ms * 1e3:.0f} us, cusolver {chol * 1e3:.0f} us, fallbacks {calls}")


if __name__ == "__main__":
    gram_table()
    solver_report()
