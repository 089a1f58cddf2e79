"""`fastdume remove-expert`: drop one domain's expert from a DUME model and re-fit its routers."""

import time
import warnings
from pathlib import Path

from fastdume.commands._common import (
    STATS_NAME,
    add_batching_args,
    add_solve_args,
    fail,
    load_model,
    load_tokenizer,
    make_batches,
    report_experts_change,
    save_model_and_stats,
    solve_kwargs,
    stats_target,
)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "remove-expert",
        help="remove a domain's expert from a DUME model (no data needed)",
        description="Remove one domain from a DUME model: its expert is dropped from every "
        "layer and the routers are re-solved from the remaining domains' statistics (--stats). "
        "Exact when the model was built with --shared base:DIR or --routed model. With "
        "mean-merged shared "
        "weights, pass the removed dense model as --expert to take it out of the mean (the "
        "statistics then become approximate, a warning says so, unless --recollect --corpus "
        "re-collects them); without --expert the shared weights keep its share (warned).",
        epilog="example: fastdume remove-expert dume/ legal --stats stats/*.safetensors "
        "--out dume-without-legal/",
    )
    parser.add_argument("model", help="DUME model directory")
    parser.add_argument("domain", help="name of the domain to remove")
    parser.add_argument(
        "--stats",
        nargs="+",
        help="statistics files of the model's domains (the removed one may be left out; "
        "not needed with --recollect)",
    )
    parser.add_argument("--out", required=True, help="output model directory (new or empty)")
    parser.add_argument(
        "--stats-out",
        help=f"where to write the statistics of the remaining domains (a new file; "
        f"default: OUT/{STATS_NAME})",
    )
    parser.add_argument(
        "--expert",
        metavar="DIR",
        help="the removed domain's dense model (mean-merged models: taken out of the shared "
        "mean; ignored for --shared base:DIR models)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_recollect_args(parser)
    add_solve_args(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON here")
    parser.set_defaults(run=run, text=None)
    return parser


def _add_recollect_args(parser):
    """add-expert's data options, minus --text: data is only read to re-collect statistics."""
    group = parser.add_argument_group("re-collecting statistics (mean-merged models)")
    group.add_argument(
        "--recollect",
        action="store_true",
        help="re-collect every remaining domain's statistics on the new model (needs --corpus)",
    )
    group.add_argument(
        "--corpus",
        action="store_true",
        help="use the domains' documents of the corpus shipped with fastdume (train split)",
    )
    add_batching_args(group)


def _check_args(args):
    if args.recollect and not args.corpus:
        raise ValueError("--recollect needs --corpus (data for every remaining domain)")
    if args.corpus and not args.recollect:
        raise ValueError("--corpus is only read with --recollect")
    if not args.recollect and not args.stats:
        raise ValueError("need --stats (statistics of the remaining domains) or --recollect")
    if args.expert is not None and not (Path(args.expert) / "config.json").is_file():
        raise ValueError(f"--expert {args.expert} is not a model directory (no config.json)")


def run(args):
    from fastdume._atomic import check_writable_directory
    from fastdume.commands.fit import load_stats
    from fastdume.merge.dynamic import remove_expert

    start = time.perf_counter()
    try:
        check_writable_directory(args.out)
        _check_args(args)
        stats_target(args)
        model = load_model(args.model)
        before = list(model.config.domains)
        stats = load_stats(args.stats, model) if args.stats else None
        batches = None
        if args.recollect:
            tokenizer = load_tokenizer(args, args.model)
            remaining = [d for d in before if d != args.domain]
            batches = {d: make_batches(args, tokenizer, d) for d in remaining}
        notes = []
        if args.expert is not None and model.config.shared != "mean":
            notes.append(f"--expert ignored: the shared weights come from {model.config.shared}")
        expert = args.expert if model.config.shared == "mean" else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            model, stats = remove_expert(
                model,
                args.domain,
                stats,
                recollect=args.recollect,
                batches=batches,
                expert=expert,
                max_tokens=args.max_tokens,
                skip_first_token=args.skip_first_token,
                progress=not args.no_progress,
                **solve_kwargs(args),
            )
        stats_out = save_model_and_stats(model, stats, args, tokenizer_from=[args.model])
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        return fail("remove-expert", err)
    notes += [str(w.message) for w in caught]
    what = f"removed expert {args.domain!r}"
    return report_experts_change(
        what, args, model, stats, stats_out, notes, start, removed=args.domain
    )
