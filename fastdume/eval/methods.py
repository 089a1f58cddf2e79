"""One public function per evaluated method, shared by `fastdume eval` and the SmolLM2 tier.

Every function scores its model on `bench`'s test batches and records a row (perplexity,
retention of the dense experts, notes) in `bench.results["methods"]`; the models that later
methods start from are returned.
"""

import copy
import dataclasses
from collections.abc import Callable

import torch

from fastdume.eval import baselines
from fastdume.eval.build import set_top_k
from fastdume.eval.finetune import train_model
from fastdume.eval.metrics import evaluate, mean_nll, retention
from fastdume.eval.mixed import evaluate_mixed, mixed_retention
from fastdume.models.modeling import forced_expert


@dataclasses.dataclass
class Bench:
    """What every method shares: the data, the domains, the results dict and the logger.

    batches_of(domain, split) -> iterable of batches; results holds "methods" and "curves";
    dense_own (each dense expert's test ppl on its own domain) is set by `dense_cross`.
    mixed_rows > 0 also scores the DUME rows and the merges on mixed-domain rows (that many per
    ordered domain pair, `fastdume.eval.mixed`; needs two domains); mixed_ref is then set by
    `dense_cross`.
    """

    batches_of: Callable
    domains: list
    results: dict
    log: Callable = print
    progress: bool = True
    dense_own: dict | None = None
    mixed_rows: int = 0
    mixed_ref: dict | None = None

    def record(self, name, res, **notes):
        entry = {**res, "retention": retention(self.dense_own, res["ppl"]), **notes}
        self.results["methods"][name] = entry
        r = entry["retention"]
        self.log(f"  {name}: mean retention {r['mean']:.2%}, worst {r['worst']:.2%}")
        return entry

    def validation_score(self, model):
        """Mean log-ppl on the validation split: selects alphas and checkpoints, never test."""
        return mean_nll(evaluate(model, self.batches_of, self.domains, "validation")["ppl"])


def dense_cross(bench, models):
    """models: {row name: dense model folder}; each is scored on every domain -> {name: result}.

    Fills results["cross"] and sets bench.dense_own from the rows named after a domain.
    """
    out, bench.mixed_ref = {}, {}
    for name, path in models.items():
        model = baselines.load_dense(path)
        out[name] = evaluate(model, bench.batches_of, bench.domains)
        bench.results["cross"][name] = out[name]["ppl"]
        if bench.mixed_rows and len(bench.domains) > 1 and name in bench.domains:
            bench.mixed_ref[name] = evaluate_mixed(
                model, bench.batches_of, bench.domains, bench.mixed_rows
            )
    bench.dense_own = {d: bench.results["cross"][d][d] for d in bench.domains}
    return out


def mixed(bench, name, model):
    """Score `model` on the mixed-domain rows into row `name` (after `record`); no-op when
    bench.mixed_rows is 0."""
    if not bench.mixed_rows or len(bench.domains) < 2:  # no domain pairs
        return None
    routing = hasattr(model, "dume_layers")
    res = evaluate_mixed(model, bench.batches_of, bench.domains, bench.mixed_rows, routing=routing)
    entry = {**mixed_retention(bench.mixed_ref, res), "pairs": res["pairs"], "curve": res["curve"]}
    bench.results["methods"][name]["mixed"] = entry
    return entry


def uniform_averaging(bench, paths):
    bench.log("uniform weight averaging")
    model = baselines.uniform_average(list(paths))
    entry = bench.record("uniform averaging", evaluate(model, bench.batches_of, bench.domains))
    mixed(bench, "uniform averaging", model)
    return entry


def task_arithmetic(bench, base, paths, alphas):
    """base + alpha * sum(expert - base), alpha chosen on validation."""
    bench.log(f"task arithmetic: tuning alpha over {list(alphas)} on validation")
    paths = list(paths)
    scores = {a: bench.validation_score(baselines.task_arithmetic(base, paths, a)) for a in alphas}
    best = min(scores, key=scores.get)
    model = baselines.task_arithmetic(base, paths, best)
    res = evaluate(model, bench.batches_of, bench.domains)
    scores = {str(a): s for a, s in scores.items()}
    entry = bench.record("task arithmetic", res, alpha=best, validation_mean_log_ppl=scores)
    mixed(bench, "task arithmetic", model)
    return entry


def moe_oracle(bench, dume, name="MoE oracle routing"):
    """Each domain's tokens forced to its own expert: the ceiling for any router."""
    ppl, tok_s = {}, []
    for e, d in enumerate(bench.domains):
        with forced_expert(dume, e):
            res = evaluate(dume, bench.batches_of, [d])
        ppl[d] = res["ppl"][d]
        tok_s.append(res["tokens_per_s"])
    res = {"ppl": ppl, "routing": None, "tokens_per_s": sum(tok_s) / len(tok_s)}
    return bench.record(name, res)


def moe_random(bench, dume, seed):
    """A copy of `dume` with Gaussian routers -> the model (BTX-style training starts there)."""
    rand = baselines.random_routers(copy.deepcopy(dume), seed=seed)
    res = evaluate(rand, bench.batches_of, bench.domains, routing=True)
    bench.record("MoE random routing", res)
    return rand


def dume_top_k(bench, dume, k):
    """DUME's routers with top-k routing, row "DUME k=<k>" -> the model (`dume` itself if k=1)."""
    model = dume if k == 1 else set_top_k(copy.deepcopy(dume), k)
    bench.record(f"DUME k={k}", evaluate(model, bench.batches_of, bench.domains, routing=True))
    if k == 1:
        mixed(bench, "DUME k=1", model)
    return model


def whole_model_name(config):
    """Row name of a routed="model" DUME: its features and depth ("default" if they are)."""
    from fastdume.models.routing import check_options

    opts = (config.router_features, config.router_depth)
    default = ", default" if opts == check_options("model")[1:] else ""
    return f"DUME whole model [{opts[0]}, {opts[1]}{default}]"


def whole_model_rows(bench, build, grid, oracle=False):
    """routed="model" rows: build(routed=, features=, depth=) -> the fitted model, for each
    (features, depth) of `grid` (None: that option's default; repeats are skipped). oracle=True
    first adds the "whole-model oracle routing" row (each domain forced to its expert: the
    dense expert itself, a check). -> the row names (the models are not kept: each is E x the
    dense model)."""
    from fastdume.models.routing import check_options

    names, seen = [], set()
    for features, depth in grid:
        options = check_options("model", features, depth)[1:]
        if options in seen:
            continue
        seen.add(options)
        bench.log(f"DUME whole model: features={options[0]}, depth={options[1]}")
        model = build(routed="model", features=options[0], depth=options[1])
        if oracle and not names:  # any routing options: forcing ignores the routers
            moe_oracle(bench, model, "whole-model oracle routing")
        name = whole_model_name(model.config)
        res = evaluate(model, bench.batches_of, bench.domains, routing=True)
        bench.record(name, res, routed="model", features=options[0], depth=options[1])
        mixed(bench, name, model)
        names.append(name)
        del model
    return names


def parse_grid(text):
    """Parse `--model-rows`: "features/depth,..." ("default" for both defaults, "" or "none"
    for no row) -> [(features, depth)]; the values are checked when the model is built."""
    if text in ("", "none"):
        return []
    grid = []
    for item in text.split(","):
        if item == "default":
            grid.append((None, None))
            continue
        features, sep, depth = item.rpartition("/")
        if not sep or not features or not depth:
            raise ValueError(f"model rows must be 'features/depth' or 'default', got {item!r}")
        grid.append((features, depth))
    return grid


@dataclasses.dataclass
class TrainRun:
    """One training row: `which` parameters ("router" or "all") of a copy of `start`."""

    name: str
    start: torch.nn.Module
    which: str
    steps: int
    lr: float
    weighting: str


def training_runs(cfg, dume, dume_k2, rand):
    """The training rows of every evaluation; cfg has router_steps, router_lr, weighting,
    full_steps and full_lr (fastdume eval's and the SmolLM2 tier's configs)."""
    w, steps, lr = cfg.weighting, cfg.router_steps, cfg.router_lr
    return [
        TrainRun("DUME+", dume, "router", steps, lr, w),
        # With k=2 the model's own weights (softmax over the two) already compare experts.
        TrainRun("DUME+ k=2", dume_k2, "router", steps, lr, "topk"),
        TrainRun("BTX-style", rand, "router", steps, lr, w),
        TrainRun("DUME full FT", dume, "all", cfg.full_steps, cfg.full_lr, w),
    ]


def trained(bench, run, seed=0, checkpoints=0):
    """Train a copy of run.start (best of `checkpoints` validation checkpoints, step 0 included)
    -> the trained model; its training losses go to results["curves"][run.name]."""
    bench.log(f"{run.name}: {run.which} training, {run.steps} steps, lr {run.lr}, "
              f"weighting {run.weighting!r}")  # fmt: skip
    torch.manual_seed(seed)
    model = copy.deepcopy(run.start)
    losses, chosen = train_model(
        model, bench.batches_of, bench.domains, run.steps, run.lr, run.which, run.weighting,
        progress=bench.progress, desc=run.name, score=bench.validation_score,
        checkpoints=checkpoints,
    )  # fmt: skip
    bench.results["curves"][run.name] = losses
    res = evaluate(model, bench.batches_of, bench.domains, routing=True)
    bench.record(run.name, res, weighting=run.weighting, steps=run.steps, lr=run.lr,
                 trained=run.which, selection=chosen)  # fmt: skip
    return model
