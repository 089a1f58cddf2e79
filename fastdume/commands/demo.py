"""`fastdume demo`: the whole DUME recipe on the shipped zoo, with a perplexity table."""

import time

from fastdume.commands._common import write_json


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="upcycle the demo zoo's experts, fit the routers, compare perplexities",
        description="End to end DUME on the model zoo shipped with fastdume: build (first run "
        "only, cached) or load a small base model and one dense expert per domain, merge the "
        "experts into one MoE (fastdume.upcycle), collect router statistics with oracle "
        "routing on each domain's training data, solve the routers in closed form, and print "
        "each model's validation perplexity per domain (every dense expert, uniform weight "
        "averaging, the paper's DUME, and DUME routing the whole model: every tensor of each "
        "expert kept, routed='model' with its default router options), each model's "
        "retention (dense expert's perplexity on its own domain / the model's), and both "
        "DUMEs' routing accuracy. Runs offline on a CPU.",
        epilog="example: fastdume demo --json demo.json",
    )
    parser.add_argument(
        "--preset",
        choices=("demo", "test"),
        default="demo",
        help="zoo size: 'demo' (default, a few minutes to build once) or 'test' (tiny, fast)",
    )
    parser.add_argument("--cache-dir", help="zoo cache (default: $FASTDUME_CACHE)")
    parser.add_argument(
        "--shared",
        choices=("mean", "base"),
        default="mean",
        help="shared weights: 'mean' of the experts (paper, default) or the zoo's base model",
    )
    parser.add_argument(
        "--stats-tokens",
        type=int,
        default=100_000,
        help="router statistics tokens per domain (default 100000)",
    )
    parser.add_argument(
        "--eval-batches",
        type=int,
        default=4,
        help="validation batches per domain for perplexity (default 4; 0 = all)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch (default 16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    parser.set_defaults(run=run)
    return parser


def _build(args, zoo, batches_of, **options):
    """Upcycle (the paper's merge, or with `options` such as routed="model"), collect oracle
    statistics, fit the routers -> (model, stats)."""
    from fastdume.merge.upcycle import upcycle
    from fastdume.router import collect_stats, fit_router

    experts = [zoo.experts[d] for d in zoo.domains]
    names = ", ".join(zoo.domains)
    if options:
        print(f"upcycling {len(zoo.domains)} dense experts ({names}), " + _describe(options))
        model = upcycle(experts, domains=zoo.domains, **options)
    else:
        shared = "mean" if args.shared == "mean" else f"base:{zoo.base}"
        print(f"upcycling {len(zoo.domains)} dense experts ({names}), shared={shared}")
        model = upcycle(experts, domains=zoo.domains, shared=shared)
    print(f"collecting router statistics ({args.stats_tokens:,} tokens per domain), fitting")
    stats = None
    for d in zoo.domains:
        stats = collect_stats(
            model,
            d,
            batches_of(d, "train"),
            max_tokens=args.stats_tokens,
            stats=stats,
            progress=not args.no_progress,
        )
    fit_router(model, stats)
    return model, stats


def _describe(options):
    return ", ".join(f"{k}={v}" for k, v in options.items())


def _ppl(model, batches_of, domains):
    from fastdume.eval.metrics import evaluate

    return evaluate(model, batches_of, domains, split="validation")["ppl"]


def retention(perplexity, domains):
    """{row: {"per_domain": {d: dense d's ppl on d / row's ppl on d}, "mean": ...}}."""
    own = {d: perplexity[f"dense expert: {d}"][d] for d in domains}
    out = {}
    for name, row in perplexity.items():
        per = {d: own[d] / row[d] for d in domains}
        out[name] = {"per_domain": per, "mean": sum(per.values()) / len(per)}
    return out


def _table(results, domains):
    width = max(12, *(len(d) for d in domains)) + 2
    lines = ["validation perplexity (lower is better)"]
    header = "".join(f"{d:>{width}}" for d in [*domains, "mean"])
    lines.append(f"{'model':<22}" + header)
    for name, row in results["perplexity"].items():
        mean = sum(row.values()) / len(row)
        cells = "".join(f"{row[d]:>{width}.2f}" for d in domains)
        lines.append(f"{name:<22}" + cells + f"{mean:>{width}.2f}")
    lines.append("")
    lines.append("retention: dense expert's perplexity on its own domain / the model's (higher is")
    lines.append("better; 100% = the specialist's quality on every domain)")
    lines.append(f"{'model':<22}" + header)
    for name, ret in results["retention"].items():
        cells = "".join(f"{ret['per_domain'][d]:>{width}.1%}" for d in domains)
        lines.append(f"{name:<22}" + cells + f"{ret['mean']:>{width}.1%}")
    for key, label in (("routing_accuracy", "DUME"), ("routing_accuracy_whole_model",
                                                        "DUME whole model")):  # fmt: skip
        lines.append("")
        lines.append(f"{label} routing accuracy (share of tokens sent to their domain's expert)")
        acc = results[key]
        routers = len(next(iter(acc.values())))
        lines.append(f"{'router':<22}" + header)
        for layer in range(routers):
            row = [acc[d][layer] for d in domains]
            cells = "".join(f"{v:>{width}.1%}" for v in row)
            lines.append(f"{layer:<22}" + cells + f"{sum(row) / len(row):>{width}.1%}")
    return "\n".join(lines)


def run(args):
    import fastdume.models  # noqa: F401  (registers DUME with transformers)
    from fastdume.data import batches, load_tokenizer
    from fastdume.data.zoo import build_zoo
    from fastdume.eval.baselines import load_dense, uniform_average
    from fastdume.eval.metrics import evaluate

    times = {}
    start = time.perf_counter()
    print(f"fastdume demo: loading the {args.preset!r} zoo (built and cached on first use)...")
    zoo = build_zoo(args.preset, cache_dir=args.cache_dir)
    times["zoo"] = time.perf_counter() - start
    tokenizer, seq_len = load_tokenizer(), zoo.config["seq_len"]
    limit = args.eval_batches or None

    def batches_of(domain, split):
        cap = limit if split == "validation" else None
        return batches(tokenizer, domain, split, seq_len, args.batch_size, max_batches=cap)

    t = time.perf_counter()
    model, stats = _build(args, zoo, batches_of)
    times["upcycle_stats_fit"] = time.perf_counter() - t
    t = time.perf_counter()
    whole, _ = _build(args, zoo, batches_of, routed="model")
    times["whole_model_build"] = time.perf_counter() - t
    t = time.perf_counter()
    results = {"perplexity": {}, "routing_accuracy": {}}
    print("evaluating validation perplexity: dense experts, uniform averaging, both DUMEs")
    for d in zoo.domains:
        dense = load_dense(zoo.experts[d])
        results["perplexity"][f"dense expert: {d}"] = _ppl(dense, batches_of, zoo.domains)
    average = uniform_average([zoo.experts[d] for d in zoo.domains])
    results["perplexity"]["uniform averaging"] = _ppl(average, batches_of, zoo.domains)
    dume = evaluate(model, batches_of, zoo.domains, split="validation", routing=True)
    results["perplexity"]["DUME"] = dume["ppl"]
    results["routing_accuracy"] = dume["routing"]
    dume = evaluate(whole, batches_of, zoo.domains, split="validation", routing=True)
    results["perplexity"]["DUME whole model"] = dume["ppl"]
    results["routing_accuracy_whole_model"] = dume["routing"]
    results["retention"] = retention(results["perplexity"], zoo.domains)
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - start
    results.update(
        preset=args.preset,
        domains=list(zoo.domains),
        shared=model.config.shared,
        whole_model={
            "routed": whole.config.routed,
            "features": whole.config.router_features,
            "depth": whole.config.router_depth,
        },  # fmt: skip
        stats_tokens={d: stats.tokens(d) for d in zoo.domains},
        seconds={k: round(v, 2) for k, v in times.items()},
    )
    print()
    print(_table(results, zoo.domains))
    print()
    print(
        f"statistics: {sum(results['stats_tokens'].values()):,} tokens over "
        f"{len(zoo.domains)} domains; took {times['total']:.1f} s "
        f"(zoo {times['zoo']:.1f}, DUME build {times['upcycle_stats_fit']:.1f}, whole-model "
        f"DUME build {times['whole_model_build']:.1f}, eval {times['eval']:.1f})"
    )
    if args.json:
        write_json(args.json, results)
    return 0
