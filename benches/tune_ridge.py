"""Time Gram-kernel launch configs and inspect the batched solver on this GPU (prints a table).

    python benches/tune_ridge.py [--budget SECONDS] [--out FILE.json]

Gram: bf16 hidden states, 65536 tokens, H in {768, 3072, 4096}, one layer, each config of the grid
against torch's bf16 X^T X in the same run. The grid: the plain tiles (BLOCK_H 64/128, BLOCK_N
64/128, 4/8 warps, 3/4 stages, split_k as ops.gram chooses it) and the schedule options of
kernels/gram.py (SCHEDULES: 128-token stages, grouped tile order, split over the tokens with the
fixed-order reduction), each timed on its own; the table and --out list the fastest per H with
its ratios to torch's bf16 full product and to the shipped default config (ops.gram._config), so
a schedule is adopted only where it measured faster.
Solver: for (1000, 65) the time of the one-program-per-matrix path and of the blocked path,
against cuSOLVER, and the share of matrices sent to the float64 fallback.
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import triton.testing

from fastdume.ops import gram, ridge

PLAIN = [
    {"block_h": h, "block_n": n, "num_warps": w, "num_stages": s}
    for h, n, w, s in itertools.product((64, 128), (64, 128), (4, 8), (3, 4))
]
SCHEDULES = [
    {"block_h": 128, "block_n": 128, "num_warps": 8, "num_stages": 2},
    {"block_h": 128, "block_n": 128, "num_warps": 16, "num_stages": 2},
    *[{"block_h": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "group_h": g}
      for g in (4, 8, 16)],
    *[{"block_h": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "split_k": k,
       "ordered_split": True} for k in (2, 4, 8)],
    {"block_h": 128, "block_n": 128, "num_warps": 8, "num_stages": 3, "group_h": 8},
]  # fmt: skip
GRID = PLAIN + SCHEDULES


def gram_table(deadline):
    """Fastest configs per H; -> {H: [(us, x bf16 full, x shipped default, config), ...]}."""
    best = {}
    for hidden in (768, 3072, 4096):
        x = torch.randn(1, 65536, hidden, device="cuda").to(torch.bfloat16)
        g = torch.zeros(1, hidden, hidden, device="cuda")
        s = torch.zeros(1, hidden, device="cuda")
        t_full = triton.testing.do_bench(lambda: x[0].T @ x[0])  # noqa: B023
        t_default = triton.testing.do_bench(lambda: gram.gram_accumulate_triton(x, g, s))  # noqa: B023
        rows = []
        for cfg in GRID:
            if time.monotonic() > deadline:
                print(f"H={hidden}: budget spent, {len(rows)} configs timed", flush=True)
                break
            tiles = -(-hidden // cfg["block_h"])
            auto = gram._config(x, False, tiles * (tiles + 1) // 2)
            cfg = {"split_k": auto["split_k"], **cfg}
            try:
                ms = triton.testing.do_bench(
                    lambda: gram.gram_accumulate_triton(x, g, s, config=cfg)  # noqa: B023
                )
            except Exception as exc:  # shared memory or registers exceeded
                print(f"H={hidden} {cfg}: {type(exc).__name__}")
                continue
            rows.append((ms, cfg))
        rows.sort(key=lambda r: r[0])
        best[hidden] = [(ms * 1e3, t_full / ms, t_default / ms, cfg) for ms, cfg in rows[:4]]
        for us, ratio, vs_default, cfg in best[hidden]:
            print(f"H={hidden} {us:8.1f} us  vs bf16 full {ratio:.2f}x  vs default "
                  f"{vs_default:.2f}x  {cfg}", flush=True)  # fmt: skip
    return best


def solver_report():
    torch.manual_seed(0)
    x = torch.randn(1000, 130, 65, dtype=torch.float64, device="cuda")
    A = x.mT @ x / 130
    B = torch.randn(1000, 65, 8, dtype=torch.float64, device="cuda")
    calls = []
    original = ridge.ridge_solve_torch
    ridge.ridge_solve_torch = lambda a, b, lam: calls.append(a.shape[0]) or original(a, b, lam)
    out = {}
    try:
        for name, config in (("one_program", None), ("blocked", {"small": False})):
            run = lambda: ridge.ridge_solve_triton(A, B, 1e-2, config=config)  # noqa: B023
            run()
            out[name] = triton.testing.do_bench(run) * 1e3
    finally:
        ridge.ridge_solve_torch = original
    M = A + 1e-2 * torch.eye(65, dtype=torch.float64, device="cuda")
    out["cusolver"] = (
        triton.testing.do_bench(lambda: torch.cholesky_solve(B, torch.linalg.cholesky(M))) * 1e3
    )
    print(f"solve (1000, 65) us: {out}, fallbacks {calls}", flush=True)
    return {**out, "fallbacks": calls}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for the Gram grid")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    results = {"solver_us": solver_report()}
    results["gram_best"] = gram_table(time.monotonic() + args.budget)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
