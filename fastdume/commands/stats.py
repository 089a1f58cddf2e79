"""`fastdume stats`: a DUME model + one domain's data in, router statistics file out."""

import itertools
import os
import time
from pathlib import Path

from fastdume.commands._common import (
    add_data_args,
    fail,
    load_model,
    load_tokenizer,
    make_batches,
    write_json,
)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "stats",
        help="collect one domain's router statistics from a DUME model",
        description="Run one domain's data through an upcycled DUME model with every layer forced "
        "to that domain's expert, and store the router statistics (X^T X, sum x, token count of "
        "every MoE layer's input) as a safetensors file. Run it once per domain, then "
        "`fastdume fit MODEL STATS...`. Padding is excluded. Under torchrun every rank takes "
        "every WORLD_SIZE-th batch and the ranks' statistics are summed (rank 0 writes).",
        epilog="example: fastdume stats dume/ --domain math --corpus --out stats/math.safetensors",
    )
    parser.add_argument("model", help="DUME model directory (from `fastdume upcycle`)")
    parser.add_argument("--domain", required=True, help="which of the model's domains the data is")
    parser.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    parser.add_argument(
        "--extend",
        action="store_true",
        help="add to the statistics already in --out (more tokens, or another domain)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", help="where to run the model (default: cuda if available)")
    add_data_args(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON here")
    parser.set_defaults(run=run)
    return parser


def _distributed():
    """(rank, world): joins the process group when started by torchrun."""
    import torch
    import torch.distributed as dist

    from fastdume._dist import process_group_backend

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(process_group_backend(torch.cuda.is_available(), world))
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _device(args, rank):
    import torch

    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def run(args):
    import torch.distributed as dist

    started = not dist.is_initialized()
    try:
        return _run(args)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def _run(args):
    from fastdume.router import RouterStats, collect_stats

    start = time.perf_counter()
    out = Path(args.out)
    try:
        if out.exists() and not args.extend:
            raise ValueError(f"--out {out} exists; pass --extend to add to it, or pick a new name")
        rank, world = _distributed()
        model = load_model(args.model).to(_device(args, rank))
        stats = RouterStats.load(out, model=model) if args.extend and out.exists() else None
        before = stats.tokens(args.domain) if stats and args.domain in stats.domains else 0
        tokenizer = load_tokenizer(args, args.model)
        stats = collect_stats(
            model,
            args.domain,
            itertools.islice(make_batches(args, tokenizer, args.domain), rank, None, world),
            max_tokens=args.max_tokens,
            skip_first_token=args.skip_first_token,
            stats=stats,
            progress=not args.no_progress,
        )
        if rank == 0:
            stats.save(out)
    except (ValueError, FileNotFoundError) as err:
        return fail("stats", err)
    seconds = time.perf_counter() - start
    added = stats.tokens(args.domain) - before
    summary = {
        "out": str(out),
        "domain": args.domain,
        "tokens_added": added,
        "tokens": {d: stats.tokens(d) for d in stats.domains},
        "num_layers": stats.num_layers,
        "hidden_size": stats.hidden_size,
        "routing": stats.options,
        "seconds": round(seconds, 3),
    }
    if rank != 0:
        return 0
    print(f"router statistics of {args.domain!r} -> {out}")
    print(f"  tokens:   {added} added ({added / max(seconds, 1e-9):.0f} tokens/s)")
    print(f"  file:     {', '.join(f'{d}={n}' for d, n in summary['tokens'].items())} tokens")
    options = ", ".join(f"{k}={v}" for k, v in (stats.options or {}).items())
    print(f"  routers:  {stats.num_layers}, hidden size {stats.hidden_size} ({options})")
    print("  next:     fastdume fit MODEL STATS... --out FITTED_DIR")
    if args.json:
        write_json(args.json, summary)
    return 0
