"""`fastdume eval`: DUME against every alternative on the zoo's experts and held-out data."""

from fastdume.commands._common import fail, write_json


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "eval",
        help="compare DUME with dense experts, merging baselines, routing baselines, DUME+",
        description="Build every method from the zoo's dense experts and report per-domain test "
        "perplexity, retention (dense expert's perplexity on its own domain / method's), "
        "per-layer routing accuracy and CPU tokens/s: the dense cross matrix, uniform weight "
        "averaging, task arithmetic (alpha tuned on validation), MoE with random and oracle "
        "routing, DUME k=1 and k=2, DUME+ (router-only training), BTX-style (the same training "
        "from a random router) and full fine-tuning; DUME routing the whole model "
        "(routed='model') with each router features/depth option; and, on mixed-domain rows "
        "(one domain's text, then another's), retention and routing accuracy of each half.",
        epilog="example: fastdume eval --preset demo --json eval.json --plots plots/",
    )
    parser.add_argument("--preset", choices=("demo", "test", "demo-mlp", "test-mlp"),
                        default="demo", help="zoo size; '-mlp': experts fine-tuned only in "
                        "their MLPs (same base)")  # fmt: skip
    parser.add_argument("--cache-dir", help="zoo cache (default: $FASTDUME_CACHE)")
    parser.add_argument("--quick", action="store_true", help="small sizes (tests, smoke runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order, random routers")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--plots", metavar="DIR", help="PNG plots here (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    size = parser.add_argument_group("sizes (defaults: full run; --quick lowers them)")
    for flag, kind, what in (
        ("--stats-tokens", int, "router statistics tokens per domain"),
        ("--eval-batches", int, "validation/test batches per domain"),
        ("--batch-size", int, "rows per batch"),
        ("--router-steps", int, "DUME+ / BTX-style training steps"),
        ("--router-lr", float, "DUME+ / BTX-style learning rate"),
        ("--full-steps", int, "full fine-tuning steps"),
        ("--full-lr", float, "full fine-tuning learning rate"),
        ("--checkpoints", int, "validation checkpoints per training run (best one kept)"),
    ):
        size.add_argument(flag, type=kind, help=what)
    abl = parser.add_argument_group("DUME router options and ablations (defaults = the paper)")
    abl.add_argument("--lam", type=float, default=1e-2, help="ridge strength (default 1e-2)")
    abl.add_argument("--lam-mode", choices=("absolute", "trace"), default="absolute",
                     help="'absolute' (paper) or 'trace' (lam x tr(A)/dim)")  # fmt: skip
    abl.add_argument("--no-intercept", action="store_true", help="routers without bias")
    abl.add_argument("--no-normalize", action="store_true", help="keep raw router columns")
    abl.add_argument("--balance", action="store_true", help="weight domains by 1/tokens")
    abl.add_argument("--stats-mode", choices=("oracle", "sequential"), default="oracle",
                     help="'oracle': one pass, every layer forced (paper); 'sequential': layer "
                     "by layer under DUME's routing of earlier layers")  # fmt: skip
    abl.add_argument(
        "--weighting",
        choices=("switch", "st", "topk"),
        default="st",
        help="router weighting while training: 'st' (straight-through, default: "
        "inference forward, full-softmax gradient), 'switch' (x full-softmax prob.), "
        "'topk' (the model's; k=1: no grad)",
    )
    abl.add_argument(
        "--ablations",
        action="store_true",
        help="also fit and evaluate the router variants (one change each)",
    )
    abl.add_argument("--ablation-tokens", metavar="N,N,...", type=_ints,
                     help="statistics budgets (tokens per domain) of the ablation rows, from one "
                     "statistics pass (default 1000,10000,100000,1000000)")  # fmt: skip
    abl.add_argument("--model-rows", metavar="F/D,...", type=_grid,
                     help="routed='model' rows as features/depth pairs ('default' = its "
                     "defaults, 'none' = no row; default: token, context, context:16 x layer, "
                     "cumulative, single, and vocab, vocab:16 x single); fitted with "
                     "--stats-mode like DUME")  # fmt: skip
    abl.add_argument(
        "--mixed-rows",
        type=int,
        help="mixed-domain rows per ordered domain pair (0: none; default 8)",
    )
    abl.add_argument(
        "--no-training",
        action="store_true",
        help="skip the training rows (DUME+, DUME+ k=2, BTX-style, full FT)",
    )
    abl.add_argument("--routers-only", action="store_true",
                     help="only the dense experts, the MoE routing rows (random, oracle, DUME "
                     "k=1/2) and the ablations: no merging baselines, no training")  # fmt: skip
    parser.set_defaults(run=run)
    return parser


def _ints(text):
    import argparse

    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def _grid(text):
    import argparse

    from fastdume.eval.methods import parse_grid

    try:
        return tuple(parse_grid(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def config_from_args(args):
    from fastdume.eval import EvalConfig

    kwargs = dict(
        preset=args.preset, cache_dir=args.cache_dir, seed=args.seed, lam=args.lam,
        lam_mode=args.lam_mode, normalize=not args.no_normalize, intercept=not args.no_intercept,
        balance=args.balance, stats_mode=args.stats_mode, weighting=args.weighting,
        ablations=args.ablations, routers_only=args.routers_only, progress=not args.no_progress,
        training=not args.no_training,
    )  # fmt: skip
    for name in ("stats_tokens", "eval_batches", "batch_size", "router_steps", "router_lr",
                 "full_steps", "full_lr", "checkpoints", "ablation_tokens", "model_rows",
                 "mixed_rows"):  # fmt: skip
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return EvalConfig.quick(**kwargs) if args.quick else EvalConfig(**kwargs)


def run(args):
    from fastdume.eval import run_eval
    from fastdume.eval.report import markdown, plot

    try:
        cfg = config_from_args(args)
        cfg.check()
    except ValueError as err:
        return fail("eval", err)
    results = run_eval(cfg)
    print()
    print(markdown(results))
    print(f"\ntook {results['seconds']:.1f} s")
    if args.plots:
        paths = plot(results, args.plots)
        print(f"plots: {', '.join(paths)}" if paths else "plots skipped: matplotlib not installed")
    if args.json:
        write_json(args.json, results)
    return 0
