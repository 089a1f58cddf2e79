"""Helpers shared by the commands: data options, loading, saving, reporting."""

import json
import shutil
import sys
import time
from pathlib import Path

from fastdume._atomic import write_json  # noqa: F401  (the commands import it from here)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


STATS_NAME = "router_stats.safetensors"  # default --stats-out inside OUT


def add_data_args(parser, what="the domain's"):
    group = parser.add_argument_group("data (one of --corpus or --text)")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--corpus",
        action="store_true",
        help=f"use {what} documents of the corpus shipped with fastdume (train split)",
    )
    source.add_argument(
        "--text",
        metavar="FILE",
        help="your own documents: a .jsonl file with a 'text' field per line, or a text file "
        "with documents separated by blank lines",
    )
    add_batching_args(group)


def add_batching_args(group):
    """How documents become token batches: shared by every command that collects statistics."""
    group.add_argument("--seq-len", type=int, default=128, help="tokens per row (default 128)")
    group.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    group.add_argument(
        "--max-tokens", type=int, help="stop after this many tokens (default: all the data)"
    )
    group.add_argument(
        "--skip-first-token",
        action="store_true",
        help="leave out the first token of every row (often an outlier hidden state)",
    )
    group.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer directory (default: the model directory's, else fastdume's shipped one)",
    )


def load_tokenizer(args, model_dir):
    from transformers import AutoTokenizer

    for candidate in (args.tokenizer, model_dir):
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(candidate))
    if args.tokenizer:
        raise ValueError(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
    from fastdume.data import load_tokenizer as shipped

    return shipped()


def read_documents(path):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--text {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"--text {path} line {n}: need {{'text': ...}} ({err})"
                    ) from None
        return docs
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def text_batches(tokenizer, documents, seq_len, batch_size):
    """Documents -> rows of seq_len tokens (right-padded, masked) -> batches of dicts."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=True)["input_ids"]
        rows.extend(ids[i : i + seq_len] for i in range(0, len(ids), seq_len))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = torch.full((len(chunk), seq_len), pad, dtype=torch.int64)
        mask = torch.zeros((len(chunk), seq_len), dtype=torch.int64)
        for i, row in enumerate(chunk):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        yield {"input_ids": ids, "attention_mask": mask}


def make_batches(args, tokenizer, domain):
    if args.corpus:
        from fastdume.data import batches, domains

        if domain not in domains():
            raise ValueError(
                f"--corpus has the domains {domains()}, not {domain!r}; use --text FILE"
            )
        return batches(tokenizer, domain, "train", args.seq_len, args.batch_size)
    return text_batches(tokenizer, read_documents(args.text), args.seq_len, args.batch_size)


def load_model(path):
    import transformers

    import fastdume.models  # noqa: F401  (registers DUME with transformers)

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory (no config.json)")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    if not hasattr(model, "dume_layers"):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a DUME model")
    return model.eval()


def save_model(model, out, tokenizer_from=()):
    """save_pretrained into a temporary directory renamed to `out` (must be new or empty)."""
    from fastdume._atomic import atomic_directory

    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        for source in tokenizer_from:
            files = [Path(source) / f for f in TOKENIZER_FILES if (Path(source) / f).is_file()]
            for file in files:
                shutil.copy2(file, Path(tmp) / file.name)
            if files:
                break


def stats_target(args):
    """Where --stats-out (default OUT/router_stats.safetensors) goes: (its path relative to OUT,
    None) or (None, a new file outside OUT). Raises for OUT itself or an existing file."""
    out = Path(args.out).resolve()
    target = Path(args.stats_out or Path(args.out) / STATS_NAME).resolve()
    if target == out:
        raise ValueError(f"--stats-out {args.stats_out} is the output directory; name a file")
    if target.is_relative_to(out):
        return target.relative_to(out), None
    if target.exists():
        raise FileExistsError(f"--stats-out {str(args.stats_out)!r} exists; give a new file")
    return None, target


def save_model_and_stats(model, stats, args, tokenizer_from=()):
    """OUT (model, tokenizer and, by default, the statistics) appears whole or not at all; a
    --stats-out file outside OUT is removed again if OUT cannot be written. Returns the
    statistics' path."""
    from fastdume._atomic import atomic_directory

    inside, outside = stats_target(args)
    try:
        with atomic_directory(args.out) as tmp:
            # save_model writes an empty directory atomically: here the temporary one
            save_model(model, tmp, tokenizer_from)
            if inside is not None:
                (tmp / inside).parent.mkdir(parents=True, exist_ok=True)
                stats.save(tmp / inside)
            else:
                outside.parent.mkdir(parents=True, exist_ok=True)
                stats.save(outside)
    except BaseException:
        if outside is not None:
            outside.unlink(missing_ok=True)
        raise
    return Path(args.out) / inside if inside is not None else Path(args.stats_out)


def report_experts_change(what, args, model, stats, stats_out, notes, start, **extra):
    """Print and (with --json) write what add-expert / remove-expert produced; returns 0."""
    summary = {
        "out": str(args.out),
        "stats_out": str(stats_out),
        **extra,
        "domains": list(model.config.domains),
        "tokens": {d: stats.tokens(d) for d in model.config.domains},
        "shared": model.config.shared,
        "warnings": notes,
        "seconds": round(time.perf_counter() - start, 3),
    }
    print(f"{what} -> {args.out} ({len(summary['domains'])} experts)")
    for d in summary["domains"]:
        print(f"  {d:<16} {summary['tokens'][d]:>12,} tokens")
    print(f"  statistics of the new set -> {stats_out}")
    for note in notes:
        print(f"  note: {note}")
    print(f"  took {summary['seconds']:.1f} s")
    if args.json:
        write_json(args.json, summary)
    return 0


def fail(command, err):
    print(f"fastdume {command}: error: {err}", file=sys.stderr)
    return 2


def add_solve_args(parser):
    group = parser.add_argument_group("router solve (defaults = the DUME paper)")
    group.add_argument("--lam", type=float, default=1e-2, help="ridge strength (default 1e-2)")
    group.add_argument(
        "--lam-mode",
        choices=("absolute", "trace"),
        default="absolute",
        help="'absolute' (paper) or 'trace': lam scaled by tr(A)/dim, same lam for any data size",
    )
    group.add_argument(
        "--no-normalize", action="store_true", help="keep raw columns (paper: unit-norm)"
    )
    group.add_argument("--no-intercept", action="store_true", help="fit routers without bias")
    group.add_argument(
        "--balance", action="store_true", help="weight each domain's statistics by 1/tokens"
    )


def solve_kwargs(args):
    return {
        "lam": args.lam,
        "lam_mode": args.lam_mode,
        "normalize": not args.no_normalize,
        "fit_intercept": not args.no_intercept,
        "balance": args.balance,
    }
