"""Tune the fused MoE launch configs on this GPU for the bench shapes; writes the data file.

    python benches/tune_moe.py --out DIR [--budget SECONDS] [--workers N]

For each shape key of bench_moe.GPU_SHAPES (bf16) and T in {1, 16, 128, 1024, 4096}, `search`
runs a coordinate descent over the config schema of fastdume/ops/moe_configs, timing the whole
Triton forward (routing included): for each BLOCK_M of the token class, gemm1's tiles, then
gemm2's (each GEMM also tries its swap-AB tiles when BLOCK_M < 64), then gemm2's SPLIT_K (T <= 128),
then FUSED_ROUTING (T <= 256). Every step keeps the incumbent unless a candidate is strictly
faster, so a design option lands in the file only where it measured faster. A key with two top-k
values is timed at both and scored by the sum. Every tile candidate is compiled first in parallel
worker processes on small proxy tensors with the same Triton specialisation, so the timing loop
mostly reads Triton's cache. Output: DIR/<device name>.json in fastdume/ops/moe_configs' format,
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

from fastdume.ops import _backend, moe_configs

TOKENS = (1, 16, 128, 1024, 4096)
PROXY = (4, 256, 512)  # E, H, I: multiples of 16 like every bench shape, so the same kernels
SPLITS = (2, 4, 8)  # gemm2 SPLIT_K tried for T <= SPLIT_MAX_T
SPLIT_MAX_T = 128
FUSED_MAX_T = 256  # FUSED_ROUTING (one program routes every token) tried up to this T


def space(num_tokens):
    """(BLOCK_M values, per-GEMM plain-design candidates) for a token count."""
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


def swap_space():
    """Tiles tried with SWAP_AB (BLOCK_M < 64 only): the weight side becomes the MMA's M, so
    BLOCK_N >= 64 (one warpgroup's wgmma M on sm_90)."""
    grid = itertools.product((64, 128), (64, 128, 256), (3, 4))
    return [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": 4, "num_stages": s, "SWAP_AB": True}
            for n, k, s in grid]  # fmt: skip


def gemm_options(num_tokens, block_m):
    plain = space(num_tokens)[block_m]
    return plain + (swap_space() if block_m < 64 else [])


def _argmin(options, measure):
    """The first option with the smallest time: the incumbent (listed first) wins ties."""
    best, best_ms = None, math.inf
    for option in options:
        ms = measure(option)
        if ms < best_ms:
            best, best_ms = option, ms
    return best, best_ms


def search(num_tokens, base, measure):
    """Best complete config for one T, and its time; measure(config) -> ms (inf if it fails)."""
    full = lambda c: moe_configs.validate(c, "tune")  # noqa: E731
    best, best_ms = None, math.inf
    for m in space(num_tokens):
        cfg = full({**base, "BLOCK_M": m})
        for which in ("gemm1", "gemm2"):
            options = [full({**cfg, which: g}) for g in gemm_options(num_tokens, m)]
            cfg, _ = _argmin(options, measure)
            if cfg is None:
                break
        if cfg is None:
            continue
        if num_tokens <= SPLIT_MAX_T:
            splits = [{**cfg, "gemm2": {**cfg["gemm2"], "SPLIT_K": s}} for s in SPLITS]
            cfg, _ = _argmin([cfg, *splits], measure)
        if num_tokens <= FUSED_MAX_T:
            cfg, _ = _argmin([cfg, {**cfg, "FUSED_ROUTING": True}], measure)
        ms = measure(cfg)
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best, best_ms


def compile_configs(num_tokens, base):
    """Configs whose runs compile every kernel variant `search` can time at this T."""
    out = []
    for m in space(num_tokens):
        cfg = moe_configs.validate({**base, "BLOCK_M": m}, "tune")
        for which, g in itertools.product(("gemm1", "gemm2"), gemm_options(num_tokens, m)):
            out.append({**cfg, which: {**cfg[which], **g}})
        if num_tokens <= SPLIT_MAX_T:
            out += [{**cfg, "gemm2": {**cfg["gemm2"], "SPLIT_K": s}} for s in SPLITS]
        if num_tokens <= FUSED_MAX_T:
            out.append({**cfg, "FUSED_ROUTING": True})
    return out


def inputs(num_tokens, shape):
    return make(num_tokens, *shape, torch.bfloat16, "cuda")


def compile_one(job):
    """Worker: run one config once on proxy tensors; Triton keeps the binaries in its cache."""
    num_tokens, top_k, config = job
    kern = _backend.kernels("moe_grouped", torch.device("cuda"))
    try:
        kern.forward(*inputs(num_tokens, PROXY), top_k, 1.0, config)
        torch.cuda.synchronize()
    except Exception as exc:  # out of shared memory or registers: the timing skips it
        return repr(exc)[:200]
    return None


def timed(kern, cases, config):
    total = 0.0
    for args, top_k in cases:
        try:
            run = functools.partial(kern.forward, *args, top_k, 1.0, config)
            total += triton.testing.do_bench(run, warmup=10, rep=30)
        except Exception:
            return math.inf
    return total


def tune(kern, pool, num_tokens, shapes):
    """Best config and its summed ms for one key at one token count."""
    e, h, i, _ = shapes[0]
    base = moe_configs.get_config(e, h, i, torch.bfloat16, None, num_tokens)
    configs = compile_configs(num_tokens, base)
    list(pool.map(compile_one, [(num_tokens, s[3], c) for s in shapes for c in configs]))
    cases = [(inputs(num_tokens, s[:3]), s[3]) for s in shapes]
    return search(num_tokens, base, functools.partial(timed, kern, cases))


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
