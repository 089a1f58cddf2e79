"""`fastdume fit`: a DUME model + router statistics files in, a model with fitted routers out."""

import time

from fastdume.commands._common import (
    add_solve_args,
    fail,
    load_model,
    save_model,
    solve_kwargs,
    write_json,
)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "fit",
        help="solve the routers in closed form from statistics files",
        description="Solve every layer's router of a DUME model in closed form (ridge regression "
        "of the domain one-hot on the MoE input, DUME paper) from the statistics written by "
        "`fastdume stats`, and save the fitted model. The statistics must cover every domain of "
        "the model and come from this model (checked).",
        epilog="example: fastdume fit dume/ stats/*.safetensors --out dume-fitted/",
    )
    parser.add_argument("model", help="DUME model directory")
    parser.add_argument("stats", nargs="+", help="statistics files from `fastdume stats`")
    parser.add_argument("--out", required=True, help="output model directory (new or empty)")
    add_solve_args(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON here")
    parser.set_defaults(run=run)
    return parser


def load_stats(paths, model):
    from fastdume.router import RouterStats

    total = None
    for path in paths:
        stats = RouterStats.load(path, model=model)
        total = stats if total is None else total + stats
    return total


def run(args):
    from fastdume._atomic import check_writable_directory
    from fastdume.router import fit_router

    start = time.perf_counter()
    try:
        check_writable_directory(args.out)
        model = load_model(args.model)
        stats = load_stats(args.stats, model)
        fit_router(model, stats, **solve_kwargs(args))
        save_model(model, args.out, tokenizer_from=[args.model])
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        return fail("fit", err)
    summary = {
        "out": str(args.out),
        "domains": list(model.config.domains),
        "tokens": {d: stats.tokens(d) for d in model.config.domains},
        "solve": solve_kwargs(args),
        "seconds": round(time.perf_counter() - start, 3),
    }
    print(f"fitted {len(model.dume_routers())} routers -> {args.out}")
    for d in summary["domains"]:
        print(f"  {d:<16} {summary['tokens'][d]:>12,} tokens")
    s = summary["solve"]
    print(
        f"  solve: lam={s['lam']:g} ({s['lam_mode']}), normalize={s['normalize']}, "
        f"intercept={s['fit_intercept']}, balance={s['balance']}"
    )
    print(f"  took {summary['seconds']:.1f} s")
    if args.json:
        write_json(args.json, summary)
    return 0
