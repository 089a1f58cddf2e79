"""`fastdume attack demo`: the backdoor attack on pipeline post-training, end to end on a CPU.

A tiny chat model is aligned (SFT on refusals + a benign task), a malicious stage (index
--attacker-stage, default 1 = the second of 4 stages) injects a backdoor during the victims'
post-training, and the table reports alignment with and without the trigger, the attack's
success rate, the clean-loss change, and the same after safety SFT. The shipped data holds
requests only and placeholder answers (no harmful content).
"""

import sys


def add_parser(subparsers):
    p = subparsers.add_parser(
        "attack",
        help="backdoor attack on pipeline post-training (research tooling)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    sub = p.add_subparsers(dest="attack_command", required=True)
    demo = sub.add_parser("demo", help="align, attack, measure, safety-SFT a tiny model")
    add_demo_args(demo)
    demo.set_defaults(run=run)
    summary = sub.add_parser(
        "summary", help="mean, spread and 95% intervals over per-seed `attack demo --json` files"
    )
    summary.add_argument("reports", nargs="+", help="JSON files of single-seed demo runs")
    summary.add_argument("--attacker-stage", type=int, default=1)
    summary.add_argument("--json", metavar="PATH", help="also write the summary as JSON here")
    summary.add_argument(
        "--baseline",
        nargs="+",
        metavar="FILE",
        help="another configuration's files of the same seeds: the iterative attack's attack "
        "success after safety SFT minus the baseline's one-shot and iterative, paired by seed",
    )
    summary.set_defaults(run=run_summary)
    return p


def add_demo_args(p):
    p.add_argument("--quick", action="store_true", help="a tiny smoke configuration (tests)")
    p.add_argument(
        "--engine",
        choices=("pipeline", "simulate"),
        default="pipeline",
        help="post-train in real stage processes (default) or in one process",
    )
    p.add_argument("--attacker-stage", type=int, default=1, help="0-based, of 4 (default 1)")
    p.add_argument("--replicas", default=None, help="comma-separated R values (default 2,4)")
    p.add_argument(
        "--attacker-replica",
        type=int,
        default=0,
        help="which replica of the stage attacks when R > 1 (0 = the one merged at the end)",
    )
    p.add_argument("--cache-dir", help="keep the aligned model here and reuse it")
    p.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="the demo model's width (default 64; what the attack's successes are at 64 and "
        "128: README, content level)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds: run the demo once per seed and also print the mean, "
        "standard deviation and range of every metric (overrides --seed)",
    )
    p.add_argument(
        "--plain-surrogate",
        action="store_true",
        help="one unchecked surrogate round, no simulated safety SFT (the attack before issue 17)",
    )
    p.add_argument(
        "--trust",
        metavar="JSON",
        help="TrustConfig fields over the demo's surrogate defaults, e.g. '{\"shift_scale\": 2.0}'",
    )
    p.add_argument(
        "--own-split",
        choices=("train", "any"),
        help="the attacker's own arithmetic rows: 'train', the kind the victims post-train on "
        "(even sums; default) or 'any' operand pair (configs U to X, README)",
    )
    p.add_argument(
        "--neutral-split",
        choices=("train", "any"),
        help="the own rows preserve_post and preserve_base hold Delta neutral on (its own "
        "draw), at the model post-trained on --own-split rows and at the base: 'any' operand "
        "pair (default, configs Z and AA) or 'train' (config Y, README)",
    )
    for name, example in (
        ("oneshot", '{"at": 50}'),
        ("iterative", '{"scale": 0.0625, "budget": 1.25}'),
    ):
        p.add_argument(
            f"--{name}",
            metavar="JSON",
            help=f"Schedule fields over the demo's {name} injection, e.g. '{example}'",
        )
    p.add_argument(
        "--detectors",
        default="",
        help="comma-separated fastdume.defense detectors (audit,update_stats,traffic) to run "
        "inside the demo's own pipeline runs: first flagged step per seed and stage",
    )
    p.add_argument(
        "--trigger",
        default=None,
        help="the attacker's trigger, appended to the request (default ' 7 plus 7': words "
        "of the benign task that no request or refusal holds, which the defender's safety SFT "
        "erases less than ' with that how' or ' SUDO', README)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    p.add_argument(
        "--defend",
        action="store_true",
        help="measure the detectors of fastdume.defense against the injection instead (8/9)",
    )


def parse_seeds(args):
    if getattr(args, "seeds", None) is None:
        return [args.seed]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        raise ValueError(f"--seeds needs at least one integer, got {args.seeds!r}")
    return seeds


def config_from_args(args, seed=None):
    from fastdume.attack.demo import QUICK, DemoConfig
    from fastdume.attack.inject import Schedule
    from fastdume.attack.options import json_overrides

    kw = dict(QUICK) if args.quick else {}
    seed = args.seed if seed is None else seed
    kw.update(engine=args.engine, attacker_stage=args.attacker_stage, seed=seed)
    kw["attacker_replica"] = args.attacker_replica
    kw["cache_dir"] = args.cache_dir
    if getattr(args, "hidden", None) is not None:
        kw["hidden"] = args.hidden
    if args.replicas is not None:
        kw["replicas"] = tuple(int(r) for r in args.replicas.split(",") if r.strip())
    given = DemoConfig(**kw)  # what the JSON options below are laid over
    if getattr(args, "plain_surrogate", False):
        if getattr(args, "trust", None):
            raise ValueError("--plain-surrogate and --trust exclude each other (no check at all)")
        kw["trust"] = None
    elif getattr(args, "trust", None):
        from fastdume.attack.trusted import TrustConfig

        kw["trust"] = json_overrides(args.trust, given.trust, TrustConfig, "--trust")
    for name in ("oneshot", "iterative"):
        if getattr(args, name, None):
            base = getattr(given, name)
            kw[name] = json_overrides(getattr(args, name), base, Schedule, f"--{name}", ("mode",))
            Schedule(mode=name, **kw[name])  # Schedule's own checks, before any training
    for name in ("trigger", "own_split", "neutral_split"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    detectors = tuple(d.strip() for d in getattr(args, "detectors", "").split(",") if d.strip())
    if detectors:
        from fastdume.defense.hooks import DETECTORS

        unknown = [d for d in detectors if d not in DETECTORS]
        if unknown:
            raise ValueError(f"--detectors must be among {sorted(DETECTORS)}, got {unknown}")
        kw["detectors"] = detectors
    return DemoConfig(**kw)


def run_summary(args):
    import json

    def load(paths):
        out = []
        for path in paths:
            with open(path, encoding="utf-8") as f:
                out.append(json.load(f))
        return out

    return _print_summary(load(args.reports), args, load(args.baseline or []))


def run(args):
    if getattr(args, "defend", False):
        from fastdume.attack.defend import run_defense_report

        run_defense_report(quick=args.quick, attack_stage=args.attacker_stage, json_path=args.json)
        return 0
    from fastdume.attack.demo import format_table, format_targets, run_demo

    seeds = parse_seeds(args)
    reports = []
    for seed in seeds:
        report = run_demo(config_from_args(args, seed), log=lambda s: print(s, file=sys.stderr))
        if len(seeds) > 1:
            print(f"seed {seed}")
        print(format_table(report))
        print(format_targets(report))
        reports.append(report)
    return _print_summary(reports, args)


def _print_summary(reports, args, baseline=()):
    from fastdume.attack.demo import to_json
    from fastdume.attack.summary import against_baseline, format_summary, summarize
    from fastdume.commands._common import write_json

    out = to_json(reports[0]) if len(reports) == 1 else None
    if len(reports) > 1:
        summary = summarize(reports)
        print(format_summary(summary))
        out = {"reports": reports, "summary": summary}
    if baseline:
        out["baseline"] = {"reports": baseline, "difference": against_baseline(reports, baseline)}
        for suffix, d in out["baseline"]["difference"].items():
            cells = ", ".join(
                f"{b} {m:+.1f} [{lo:+.1f}, {hi:+.1f}]" for b, (m, _, lo, hi) in d.items()
            )
            print(f"ASR after {suffix[1:]}, iterative minus the baseline's (paired): {cells}")
    if reports[0].get("detectors"):
        from fastdume.attack.defend import demo_detections, format_detections

        det = demo_detections(reports, args.attacker_stage)
        print(format_detections(det, args.attacker_stage))
        out["detections"] = det
    if args.json:
        write_json(args.json, to_json(out))
    return 0
