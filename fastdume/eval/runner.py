"""`run_eval`: every method on the same experts and the same held-out (test) batches."""

import copy
import dataclasses
import time

import torch

from fastdume.eval import baselines
from fastdume.eval.build import build_dume, fit_sequential, nested_oracle_stats, set_top_k
from fastdume.eval.finetune import WEIGHTINGS, train_model
from fastdume.eval.metrics import evaluate, mean_nll, retention
from fastdume.moe import forced_expert
from fastdume.router import fit_router

ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


@dataclasses.dataclass
class EvalConfig:
    preset: str = "demo"
    cache_dir: str | None = None
    seed: int = 0
    stats_tokens: int = 100_000
    eval_batches: int = 8
    batch_size: int = 16
    lam: float = 1e-2
    lam_mode: str = "absolute"
    normalize: bool = True
    intercept: bool = True
    balance: bool = False
    stats_mode: str = "oracle"
    router_steps: int = 200
    router_lr: float = 1e-3
    weighting: str = "st"
    checkpoints: int = 4
    full_steps: int = 30
    full_lr: float = 1e-4
    alphas: tuple = ALPHAS
    ablations: bool = False
    # Statistics budgets (tokens per domain) of the ablation rows, besides stats_tokens.
    ablation_tokens: tuple = (1000, 10_000, 100_000, 1_000_000)
    # Only the dense experts and the MoE routing rows (and the ablations): no merging
    # baselines, no training.
    routers_only: bool = False
    progress: bool = True

    @classmethod
    def quick(cls, **overrides):
        small = dict(stats_tokens=2000, eval_batches=2, batch_size=8, router_steps=8,
                     full_steps=2, checkpoints=2, alphas=(0.25, 0.5),
                     ablation_tokens=(1000,))  # fmt: skip
        return cls(**{**small, **overrides})

    def solve_kwargs(self):
        return dict(lam=self.lam, lam_mode=self.lam_mode, normalize=self.normalize,
                    fit_intercept=self.intercept, balance=self.balance)  # fmt: skip

    def check(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        for name in ("stats_tokens", "eval_batches", "batch_size", "router_steps", "full_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (
            isinstance(self.checkpoints, bool)
            or not isinstance(self.checkpoints, int)
            or (self.checkpoints < 0)
        ):
            raise ValueError(f"checkpoints must be an int >= 0, got {self.checkpoints!r}")
        tokens = self.ablation_tokens
        if isinstance(tokens, (int, str)) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in tokens
        ):
            raise ValueError(f"ablation_tokens must be positive ints, got {tokens!r}")


def _log(msg):
    print(msg, flush=True)


def _record(results, name, res, dense_own, **notes):
    entry = {**res, "retention": retention(dense_own, res["ppl"]), **notes}
    results["methods"][name] = entry
    r = entry["retention"]
    _log(f"  {name}: mean retention {r['mean']:.2%}, worst {r['worst']:.2%}")
    return entry


def _oracle(model, batches_of, domains):
    ppl, tok_s = {}, []
    for e, d in enumerate(domains):
        with forced_expert(model, e):
            res = evaluate(model, batches_of, [d])
        ppl[d] = res["ppl"][d]
        tok_s.append(res["tokens_per_s"])
    return {"ppl": ppl, "routing": None, "tokens_per_s": sum(tok_s) / len(tok_s)}


def _baselines(cfg, zoo, batches_of, results, dense_own):
    paths = [zoo.experts[d] for d in zoo.domains]
    _log("uniform weight averaging")
    avg = baselines.uniform_average(paths)
    _record(results, "uniform averaging", evaluate(avg, batches_of, zoo.domains), dense_own)
    _log(f"task arithmetic: tuning alpha over {list(cfg.alphas)} on validation")
    scores = {}
    for alpha in cfg.alphas:
        model = baselines.task_arithmetic(zoo.base, paths, alpha)
        scores[alpha] = mean_nll(evaluate(model, batches_of, zoo.domains, "validation")["ppl"])
    best = min(scores, key=scores.get)
    model = baselines.task_arithmetic(zoo.base, paths, best)
    res = evaluate(model, batches_of, zoo.domains)
    _record(results, "task arithmetic", res, dense_own, alpha=best,
            validation_mean_log_ppl={str(a): s for a, s in scores.items()})  # fmt: skip


def _dume_variants(cfg, dume, batches_of, domains, results, dense_own):
    _record(results, "MoE oracle routing", _oracle(dume, batches_of, domains), dense_own)
    rand = baselines.random_routers(copy.deepcopy(dume), seed=cfg.seed)
    _record(results, "MoE random routing", evaluate(rand, batches_of, domains, routing=True),
            dense_own)  # fmt: skip
    _record(results, "DUME k=1", evaluate(dume, batches_of, domains, routing=True), dense_own)
    k2 = set_top_k(copy.deepcopy(dume), 2)
    _record(results, "DUME k=2", evaluate(k2, batches_of, domains, routing=True), dense_own)
    return rand, k2


def _trained(cfg, dume, rand, k2, batches_of, domains, results, dense_own):
    def score(model):  # checkpoint selection on validation data, never on test
        return mean_nll(evaluate(model, batches_of, domains, "validation")["ppl"])

    w = cfg.weighting
    runs = [
        ("DUME+", dume, "router", cfg.router_steps, cfg.router_lr, w),
        # With k=2 the model's own weights (softmax over the two) already compare experts.
        ("DUME+ k=2", k2, "router", cfg.router_steps, cfg.router_lr, "topk"),
        ("BTX-style", rand, "router", cfg.router_steps, cfg.router_lr, w),
        ("DUME full FT", dume, "all", cfg.full_steps, cfg.full_lr, w),
    ]
    for name, start, which, steps, lr, weighting in runs:
        _log(f"{name}: {which} training, {steps} steps, lr {lr}, weighting {weighting!r}")
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(start)
        losses, chosen = train_model(
            model, batches_of, domains, steps, lr, which, weighting, progress=cfg.progress,
            desc=name, score=score, checkpoints=cfg.checkpoints,
        )  # fmt: skip
        results["curves"][name] = losses
        res = evaluate(model, batches_of, domains, routing=True)
        _record(results, name, res, dense_own, weighting=weighting, steps=steps, lr=lr,
                trained=which, selection=chosen)  # fmt: skip


def run_eval(cfg):
    """Run every method; returns the results dict (also the JSON of `fastdume eval`)."""
    import fastdume  # noqa: F401  (registers DUME with transformers)
    from fastdume.commands.demo import _load_dense
    from fastdume.data import batches, load_tokenizer
    from fastdume.data.zoo import build_zoo

    cfg.check()
    if not cfg.progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    _log(f"fastdume eval: loading the {cfg.preset!r} zoo (built and cached on first use)...")
    zoo = build_zoo(cfg.preset, cache_dir=cfg.cache_dir)
    tokenizer, seq_len = load_tokenizer(), zoo.config["seq_len"]

    def batches_of(domain, split):
        cap = None if split == "train" else cfg.eval_batches
        return batches(tokenizer, domain, split, seq_len, cfg.batch_size, cap, seed=cfg.seed)

    results = {"config": {**dataclasses.asdict(cfg), "alphas": list(cfg.alphas),
                          "ablation_tokens": list(cfg.ablation_tokens)},
               "domains": list(zoo.domains), "cross": {}, "methods": {}, "curves": {}}  # fmt: skip
    _log("dense experts on every domain (test split)")
    for d in zoo.domains:
        res = evaluate(_load_dense(zoo.experts[d]), batches_of, zoo.domains)
        results["cross"][d] = res["ppl"]
        results.setdefault("dense_tokens_per_s", {})[d] = res["tokens_per_s"]
    dense_own = {d: results["cross"][d][d] for d in zoo.domains}
    results["dense_own"] = dense_own
    if not cfg.routers_only:
        _baselines(cfg, zoo, batches_of, results, dense_own)
    _log(f"DUME: upcycle, {cfg.stats_mode} statistics ({cfg.stats_tokens:,} tokens/domain), fit")
    grid = cfg.ablation_tokens if cfg.ablations else ()
    dume, stats = build_dume(zoo, batches_of, cfg.stats_tokens, cfg.solve_kwargs(),
                             cfg.stats_mode, cfg.progress, token_grid=grid)  # fmt: skip
    rand, k2 = _dume_variants(cfg, dume, batches_of, zoo.domains, results, dense_own)
    if not cfg.routers_only:
        _trained(cfg, dume, rand, k2, batches_of, zoo.domains, results, dense_own)
    if cfg.ablations:
        results["ablations"] = run_ablations(cfg, zoo, dume, stats, batches_of, dense_own)
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


PAPER = dict(lam=1e-2, lam_mode="absolute", normalize=True, fit_intercept=True, balance=False)
LAMS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2)  # absolute
TRACE_LAMS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # x tr(A) / dim(A)


def _ablation_grid(cfg):
    base = PAPER
    grid = [("paper defaults", {}, "oracle", cfg.stats_tokens, 1)]
    grid += [(f"lam={lam:g}", {"lam": lam}, "oracle", cfg.stats_tokens, 1)
             for lam in LAMS if lam != base["lam"]]  # fmt: skip
    grid += [(f"lam={lam:g} x tr(A)/dim", {"lam": lam, "lam_mode": "trace"}, "oracle",
              cfg.stats_tokens, 1) for lam in TRACE_LAMS]  # fmt: skip
    grid += [
        ("no intercept", {"fit_intercept": False}, "oracle", cfg.stats_tokens, 1),
        ("no normalisation", {"normalize": False}, "oracle", cfg.stats_tokens, 1),
        ("domain balancing", {"balance": True}, "oracle", cfg.stats_tokens, 1),
        ("sequential statistics", {}, "sequential", cfg.stats_tokens, 1),
        ("k=2", {}, "oracle", cfg.stats_tokens, 2),
    ]
    grid += [(f"stats tokens={n:,}", {}, "oracle", n, 1)
             for n in sorted(set(cfg.ablation_tokens)) if n != cfg.stats_tokens]  # fmt: skip
    return [(name, {**base, **kw}, mode, n, k) for name, kw, mode, n, k in grid]


def run_ablations(cfg, zoo, dume, stats, batches_of, dense_own):
    """DUME router variants (one change from the paper defaults each) -> list of rows.

    stats: {tokens: oracle RouterStats} from `build_dume` (None: collected here, in one pass).
    A budget above a domain's train tokens uses all of them; the row says how many were used,
    and a budget whose statistics equal a smaller one's (every domain exhausted) is skipped.
    """
    grid = _ablation_grid(cfg)
    needed = {tokens for _, _, mode, tokens, _ in grid if mode == "oracle"}
    if stats is None or not needed <= set(stats):
        stats = nested_oracle_stats(dume, batches_of, zoo.domains, needed, cfg.progress)
    rows, seen_counts = [], {}
    if cfg.stats_tokens in stats:
        seen_counts[tuple(stats[cfg.stats_tokens].tokens(d) for d in zoo.domains)] = grid[0][0]
    for name, kwargs, mode, tokens, k in grid:
        model = copy.deepcopy(dume)
        used = None
        if mode == "sequential":
            _log(f"ablation: {name}")
            fit_sequential(model, batches_of, zoo.domains, tokens, kwargs, cfg.progress)
        else:
            used = {d: stats[tokens].tokens(d) for d in zoo.domains}
            if name.startswith("stats tokens="):
                key = tuple(used.values())
                if key in seen_counts:
                    _log(f"ablation: {name} skipped (same tokens as {seen_counts[key]})")
                    continue
                seen_counts[key] = name
                if min(used.values()) < tokens:  # the corpus ran out for some domain
                    name += f" (used {min(used.values()):,}-{max(used.values()):,})"
            _log(f"ablation: {name}")
            fit_router(model, stats[tokens], **kwargs)
        set_top_k(model, k)
        res = evaluate(model, batches_of, zoo.domains, routing=True)
        ret = retention(dense_own, res["ppl"])
        acc = [sum(v[i] for v in res["routing"].values()) / len(res["routing"])
               for i in range(len(model.dume_layers()))]  # fmt: skip
        rows.append({"name": name, "ppl": res["ppl"], "retention": ret, "routing_mean": acc,
                     "stats_tokens": used})  # fmt: skip
    return rows
