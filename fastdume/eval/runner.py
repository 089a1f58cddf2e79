"""`run_eval`: every method on the same experts and the same held-out (test) batches."""

import copy
import dataclasses
import time

import torch

from fastdume.eval import methods
from fastdume.eval.build import (
    build_dume,
    build_routed,
    fit_sequential,
    nested_oracle_stats,
    set_top_k,
)
from fastdume.eval.finetune import WEIGHTINGS
from fastdume.eval.metrics import evaluate, num_routers, retention
from fastdume.router import fit_router

ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
# routed="model" rows: every features x depth option (half-life 16: a quarter of a demo row).
MODEL_ROWS = tuple((f, d) for f in ("token", "context", "context:16")
                   for d in ("layer", "cumulative", "single"))  # fmt: skip
MODEL_ROWS += (("vocab", "single"), ("vocab:16", "single"))  # the vocabulary router: single only


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
    training: bool = True  # DUME+, DUME+ k=2, BTX-style, DUME full FT
    # routed="model" DUME rows, (features, depth) each (None: the default); () for none.
    model_rows: tuple = MODEL_ROWS
    # Mixed-domain rows (domain a then b) per ordered pair for the DUME rows and the merges;
    # 0: no mixed-domain evaluation.
    mixed_rows: int = 8
    progress: bool = True

    @classmethod
    def quick(cls, **overrides):
        small = dict(stats_tokens=2000, eval_batches=2, batch_size=8, router_steps=8,
                     full_steps=2, checkpoints=2, alphas=(0.25, 0.5),
                     ablation_tokens=(1000,), mixed_rows=2)  # fmt: skip
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
            isinstance(self.mixed_rows, bool)
            or not isinstance(self.mixed_rows, int)
            or (self.mixed_rows < 0)
        ):
            raise ValueError(f"mixed_rows must be an int >= 0, got {self.mixed_rows!r}")
        if (
            isinstance(self.checkpoints, bool)
            or not isinstance(self.checkpoints, int)
            or (self.checkpoints < 0)
        ):
            raise ValueError(f"checkpoints must be an int >= 0, got {self.checkpoints!r}")
        from fastdume.models.routing import check_options

        for features, depth in self.model_rows:  # before any model is built
            check_options("model", features, depth)
        tokens = self.ablation_tokens
        if isinstance(tokens, (int, str)) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in tokens
        ):
            raise ValueError(f"ablation_tokens must be positive ints, got {tokens!r}")


def _log(msg):
    print(msg, flush=True)


def _baselines(cfg, zoo, bench):
    paths = [zoo.experts[d] for d in zoo.domains]
    methods.uniform_averaging(bench, paths)
    methods.task_arithmetic(bench, zoo.base, paths, cfg.alphas)


def _dume_variants(cfg, dume, bench):
    methods.moe_oracle(bench, dume)
    rand = methods.moe_random(bench, dume, cfg.seed)
    methods.dume_top_k(bench, dume, 1)
    k2 = methods.dume_top_k(bench, dume, 2)
    return rand, k2


def _whole_model(cfg, zoo, batches_of, bench):
    def build(**options):
        return build_routed([zoo.experts[d] for d in zoo.domains], zoo.domains, batches_of,
                            cfg.stats_tokens, cfg.solve_kwargs(), cfg.stats_mode, cfg.progress,
                            **options)  # fmt: skip

    methods.whole_model_rows(bench, build, cfg.model_rows, oracle=True)


def _trained(cfg, dume, rand, k2, bench):
    for run in methods.training_runs(cfg, dume, k2, rand):
        methods.trained(bench, run, seed=cfg.seed, checkpoints=cfg.checkpoints)


def run_eval(cfg):
    """Run every method; returns the results dict (also the JSON of `fastdume eval`)."""
    import fastdume.models  # noqa: F401  (registers DUME with transformers)
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
    bench = methods.Bench(batches_of, list(zoo.domains), results, _log, cfg.progress,
                          mixed_rows=cfg.mixed_rows)  # fmt: skip
    _log("dense experts on every domain (test split)")
    dense = methods.dense_cross(bench, {d: zoo.experts[d] for d in zoo.domains})
    results["dense_tokens_per_s"] = {d: res["tokens_per_s"] for d, res in dense.items()}
    dense_own = results["dense_own"] = bench.dense_own
    if cfg.mixed_rows:  # the dense experts on the mixed-domain rows: the retention reference
        results["mixed_reference"] = bench.mixed_ref
    if not cfg.routers_only:
        _baselines(cfg, zoo, bench)
    _log(f"DUME: upcycle, {cfg.stats_mode} statistics ({cfg.stats_tokens:,} tokens/domain), fit")
    grid = cfg.ablation_tokens if cfg.ablations else ()
    dume, stats = build_dume(zoo, batches_of, cfg.stats_tokens, cfg.solve_kwargs(),
                             cfg.stats_mode, cfg.progress, token_grid=grid)  # fmt: skip
    rand, k2 = _dume_variants(cfg, dume, bench)
    if cfg.model_rows:
        _whole_model(cfg, zoo, batches_of, bench)
    if cfg.training and not cfg.routers_only:
        _trained(cfg, dume, rand, k2, bench)
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
               for i in range(num_routers(model))]  # fmt: skip
        rows.append({"name": name, "ppl": res["ppl"], "retention": ret, "routing_mean": acc,
                     "stats_tokens": used})  # fmt: skip
    return rows
