"""`fastdume add-expert`: add one dense expert to a fitted DUME model and re-fit its routers."""

import time
import warnings

from fastdume.commands._common import (
    STATS_NAME,
    add_data_args,
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
        "add-expert",
        help="add a dense domain expert to a DUME model (only the new domain's data needed)",
        description="Add a dense expert (same family and shape, fine-tuned from the same base) "
        "to a DUME model as a new domain: its MLPs become a new expert in every layer, the new "
        "domain's router statistics are collected from --corpus/--text, the other domains' "
        "statistics are reused from --stats, and the routers are re-solved. Exact when the "
        "model was built with --shared base:DIR or --routed model; with mean-merged shared "
        "weights the old "
        "statistics become approximate (a warning says so) unless --recollect is given.",
        epilog="example: fastdume add-expert dume/ experts/legal --domain legal "
        "--stats stats/*.safetensors --corpus --out dume-plus-legal/",
    )
    parser.add_argument("model", help="DUME model directory")
    parser.add_argument("expert", help="dense expert model directory to add")
    parser.add_argument("--domain", required=True, help="name of the new domain")
    parser.add_argument(
        "--stats", nargs="+", required=True, help="statistics files of the model's domains"
    )
    parser.add_argument("--out", required=True, help="output model directory (new or empty)")
    parser.add_argument(
        "--stats-out",
        help="where to write the statistics of the new domain set (a new file; "
        f"default: OUT/{STATS_NAME})",
    )
    parser.add_argument(
        "--recollect",
        action="store_true",
        help="re-collect every domain's statistics (needs --corpus holding all the domains)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_args(parser, what="the domains'")
    add_solve_args(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON here")
    parser.set_defaults(run=run)
    return parser


def _batches(args, tokenizer, domains):
    if not args.recollect:
        return make_batches(args, tokenizer, args.domain)
    if not args.corpus:
        raise ValueError("--recollect needs --corpus (data for every domain)")
    return {d: make_batches(args, tokenizer, d) for d in domains}


def run(args):
    from fastdume._atomic import check_writable_directory
    from fastdume.commands.fit import load_stats
    from fastdume.merge.dynamic import add_expert

    start = time.perf_counter()
    try:
        check_writable_directory(args.out)
        stats_target(args)  # before any work: a bad --stats-out fails fast
        model = load_model(args.model)
        stats = load_stats(args.stats, model)
        tokenizer = load_tokenizer(args, args.model)
        domains = [*model.config.domains, args.domain]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            model, stats = add_expert(
                model,
                args.expert,
                args.domain,
                _batches(args, tokenizer, domains),
                stats,
                recollect=args.recollect,
                max_tokens=args.max_tokens,
                skip_first_token=args.skip_first_token,
                progress=not args.no_progress,
                **solve_kwargs(args),
            )
        tokenizers = [args.model, args.expert]
        stats_out = save_model_and_stats(model, stats, args, tokenizer_from=tokenizers)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        return fail("add-expert", err)
    notes = [str(w.message) for w in caught]
    what = f"added expert {args.domain!r}"
    return report_experts_change(what, args, model, stats, stats_out, notes, start)
