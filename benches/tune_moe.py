"""Tune the fused MoE launch configs on this GPU for the bench shapes; writes the data file.

    python benches/tune_moe.py --out DIR [--budget SECONDS] [--workers N]

For each shape key of bench_moe.GPU_SHAPES (bf16) and T in {1, 16, 128, 1024, 4096}: for each
BLOCK_M of the token class, gemm1's and gemm2's tiles are chosen one at a time (the forward time
is their sum plus the dispatch), holding the other at the default config. A key with two top-k
values is timed at both and scored by the sum. Every candidate is compiled first in parallel
worker processes on small proxy tensors with the same Triton specialisation, so the timing loop
only reads Triton's cache. Output: DIR/<device name>.json in fastdume/ops/moe_configs' format,
one bucket per tuned T (boundaries at geometric midpoints), rewritten after every T so a run cut
short by the budget keeps what it finished. --start FILE keeps FILE's buckets and replaces or
adds the ones tuned now (with --only KEY and --tokens T..., to finish an interrupted run).
"""

import argparse
import concurrent.futures
import functools
import itertools
import json
import math
import multiprocessing
import time
from pathlib import Path

import torch
import triton.testing
from bench_moe import GPU_SHAPES, make

from fastdume.ops import _backend, moe, moe_configs

TOKENS = (1, 16, 128, 1024, 4096)
PROXY = (4, 256, 512)  # E, H, I: multiples of 16 like every bench shape, so the same kernels


def space(num_tokens):
    """(BLOCK_M values, per-GEMM candidates) for a token count."""
    if num_tokens <= 16:
        grid = itertools.product((16,), (32, 64, 128), (64, 128, 256), (4,), (3, 4, 5))
    elif num_tokens <= 256:
        grid = itertools.product((16, 32, 64), (64, 128), (64, 128), (4,), (3, 4))
    else:
        grid = itertools.product((64, 128), (64, 128, 256), (64,), (4, 8), (3, 4))
    by_m = {}
    for m, n, k, warps, stages in grid:
        by_m.setdefault(m, []).append(
            {"BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": stages}
        )
    return by_m


def candidates(num_tokens, num_experts, hidden, inter):
    base = moe_configs.get_config(num_experts, hidden, inter, torch.bfloat16, None, num_tokens)
    for m, gemms in space(num_tokens).items():
        for which, g in itertools.product(("gemm1", "gemm2"), gemms):
            yield m, which, {**base, "BLOCK_M": m, which: g}


def inputs(num_tokens, top_k, shape):
    x, rw, rb, gu, dn = make(num_tokens, *shape, torch.bfloat16, "cuda")
    weights, ids = moe.route(x, rw, rb, top_k)
    return x, weights, ids, gu, dn


def compile_one(job):
    """Worker: run one config once on proxy tensors; Triton keeps the binary in its cache."""
    num_tokens, top_k, config = job
    kern = _backend.kernels("moe_grouped", torch.device("cuda"))
    try:
        kern.experts_forward(*inputs(num_tokens, top_k, PROXY), config)
        torch.cuda.synchronize()
    except Exception as exc:  # out of shared memory or registers: the timing skips it
        return repr(exc)[:200]
    return None


def timed(kern, cases, config):
    total = 0.0
    for args in cases:
        try:
            run = functools.partial(kern.experts_forward, *args, config)
            total += triton.testing.do_bench(run, warmup=10, rep=30)
        except Exception:
            return math.inf
    return total


def tune(kern, pool, num_tokens, shapes):
    """Best config and its summed ms for one key at one token count."""
    e, h, i, _ = shapes[0]
    jobs = [(num_tokens, s[3], c) for s in shapes for *_, c in candidates(num_tokens, e, h, i)]
    list(pool.map(compile_one, jobs))
    cases = [inputs(num_tokens, s[3], s[:3]) for s in shapes]
    best, best_ms = None, math.inf
    for m in space(num_tokens):
        pick = {}
        for _, which, config in (c for c in candidates(num_tokens, e, h, i) if c[0] == m):
            ms = timed(kern, cases, config)
            if ms < pick.get(which, (math.inf,))[0]:
                pick[which] = (ms, config[which])
        if len(pick) < 2:
            continue
        config = {"BLOCK_M": m, "gemm1": pick["gemm1"][1], "gemm2": pick["gemm2"][1]}
        ms = timed(kern, cases, config)
        if ms < best_ms:
            best, best_ms = config, ms
    return best, best_ms


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=900.0, help="seconds, checked per T")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--only", default="", help="tune only keys containing this string")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--start", type=Path, help="a config file whose buckets to keep")
    args = parser.parse_args()
    start = time.monotonic()
    kern = _backend.kernels("moe_grouped", torch.device("cuda"))
    name = torch.cuda.get_device_name()
    keys = {}
    for e, h, i, top_k in GPU_SHAPES.values():
        keys.setdefault(moe_configs.shape_key(e, h, i, torch.bfloat16), []).append((e, h, i, top_k))
    out = {"_comment": f"Tuned on {name} by benches/tune_moe.py.", "shapes": {}}
    if args.start:
        out["shapes"] = json.loads(args.start.read_text())["shapes"]
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=spawn) as pool:
        for (key, shapes), t in itertools.product(keys.items(), args.tokens):
            if args.only not in key:
                continue
            if time.monotonic() - start > args.budget:
                print(f"budget spent before {key} T={t}", flush=True)
                break
            config, ms = tune(kern, pool, t, shapes)
            print(f"{key} T={t}: {ms * 1e3:.1f} us {json.dumps(config)}", flush=True)
            buckets = out["shapes"].setdefault(key, {"buckets": []})["buckets"]
            buckets[:] = [b for b in buckets if b["tuned_at"] != t]
            buckets.append({"tuned_at": t, "us": round(ms * 1e3, 1), "config": config})
            buckets.sort(key=lambda b: b["tuned_at"])
            write(args.out / moe_configs.file_name(name), out)


def write(path, tuned):
    """Bucket bounds at the geometric midpoints between tuned T, the last open-ended."""
    data = json.loads(json.dumps(tuned))
    for entry in data["shapes"].values():
        b = entry["buckets"]
        for lo, hi in zip(b[:-1], b[1:], strict=True):
            lo["max_tokens"] = int(math.sqrt(lo["tuned_at"] * hi["tuned_at"]))
        b[-1]["max_tokens"] = None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
