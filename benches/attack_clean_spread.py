"""How far apart honest post-training runs end: the noise floor of issue 17's stealth target.

    OMP_NUM_THREADS=1 python benches/attack_clean_spread.py --seed 0 --orders 6 \
        --cache-dir /work/cache --report s0.json [--attacked]

The demo's aligned model (built, or loaded from --cache-dir), then the victims' clean post-
training on the real 4-stage pipeline under --orders data orders (the demo's own first, then
others), each measured by the demo's validation loss (odd sums) and task loss (held-out rows of
the training kind). Prints one JSON line: the losses, their means and sample SDs. With --report
(a `fastdume attack demo --json` file of the same seed and machine), also where its attacked
runs' losses sit: the change against the clean run of the same order (the demo's "within 2%"
target) and against the clean orders' mean, in their SDs. A defender never has the clean run of
its own order; the spread over orders is what it could know. --attacked: also trains the demo's
surrogate and runs the iterative attack under every order, and, as a control, the same schedule
injecting a random direction with Delta's norm per tensor; prints each one's loss changes
against the clean run of the same order, mean and 95% interval over orders ("iterative",
"random"; the task loss's: "iterative_task", "random_task"). Numbers:
fastdume/attack/MEASUREMENTS.md, "the stealth target against the clean runs' own spread".
"""

import argparse
import json
import statistics

import torch

from fastdume.attack.chat import encode_pair
from fastdume.attack.demo import (
    DemoConfig,
    aligned_model,
    attacker_surrogate,
    demo_data,
    loss_rows,
    pipeline_post,
)
from fastdume.attack.evaluate import response_loss
from fastdume.attack.judges import RefusalJudge
from fastdume.attack.stats import mean_interval
from fastdume.attack.surrogate import backdoor_delta
from fastdume.pipeline.partition import stage_param_names


def post_losses(cfg, model, tok, benign, orders, delta=None):
    """The demo's two losses (validation, odd sums; task, held-out rows of the training kind)
    after its post-training under each data order -> (val losses, task losses); with delta,
    injected on the demo's iterative schedule by the attacker's stage."""
    val, task = loss_rows(cfg, benign)
    seq_len = max(len(encode_pair(tok, p, r)[0]) for p, r in benign)
    schedule = None if delta is None else {"mode": "iterative", **cfg.iterative}
    vals, tasks = [], []
    for order in orders:
        m, _ = pipeline_post(cfg, model, tok, benign, seq_len, delta, schedule, seed=order)
        vals.append(response_loss(m, tok, val))
        tasks.append(response_loss(m, tok, task))
    return vals, tasks


def random_like(delta, seed):
    """A random direction with Delta's Frobenius norm on every tensor (the control)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, d in delta.items():
        r = torch.randn(d.shape, generator=g, dtype=torch.float64)
        out[name] = (r * d.double().norm() / r.norm()).to(d.dtype)
    return out


def place(report, losses):
    """Each attacked R = 1 run's loss against the clean run of its order (losses[0]) and
    against the clean orders' mean, in their sample SDs."""
    res = report["results"]
    mean, sd = statistics.mean(losses), statistics.stdev(losses)
    out = {"reproduced": res["clean"]["val_loss"] / losses[0] - 1}
    for name in ("oneshot", "iterative"):
        loss = res[name]["val_loss"]
        out[name] = {"vs_same_order": loss / losses[0] - 1, "sds_from_mean": (loss - mean) / sd}
    return out


def paired_change(losses, clean):
    """Per-order change % against the clean run of the same order: mean and 95% interval."""
    xs = [100 * (a / c - 1) for a, c in zip(losses, clean, strict=True)]
    mean, sd, lo, hi = mean_interval(xs)
    return {"losses": losses, "change_pct": xs, "mean": mean, "sd": sd, "ci95": [lo, hi]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orders", type=int, default=6, help="data orders, the demo's first")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--report", default=None, help="a demo --json report of the same seed")
    ap.add_argument("--attacked", action="store_true", help="also the attack and a control")
    args = ap.parse_args()
    if args.orders < 2:
        raise SystemExit(f"--orders must be at least 2 (a spread), got {args.orders}")
    torch.set_num_threads(1)
    cfg = DemoConfig(seed=args.seed, cache_dir=args.cache_dir)
    orders = [cfg.seed] + [cfg.seed + 7919 * k for k in range(1, args.orders)]
    train, _, _, benign, tok = demo_data(cfg)

    def enc(pairs):
        return [encode_pair(tok, p, r) for p, r in pairs]

    model = aligned_model(cfg, tok, enc([(e.prompt, e.chosen) for e in train]), enc(benign))
    clean, clean_task = post_losses(cfg, model, tok, benign, orders)
    out = {"seed": cfg.seed, "orders": orders, "losses": clean, "task_losses": clean_task}
    out.update(mean=statistics.mean(clean), sd=statistics.stdev(clean))
    out.update(task_mean=statistics.mean(clean_task), task_sd=statistics.stdev(clean_task))
    if args.report:
        with open(args.report) as f:
            report = json.load(f)
        if report["config"]["seed"] != cfg.seed:
            raise SystemExit(f"--report is seed {report['config']['seed']}, not {cfg.seed}")
        out["report"] = place(report, clean)
    if args.attacked:
        names = stage_param_names(model, cfg.num_stages, cfg.attacker_stage)
        judge = RefusalJudge()
        surrogate, _ = attacker_surrogate(cfg, model, tok, train, names, judge, lambda s: None)
        delta = backdoor_delta(model, surrogate, names)
        for name, d in (("iterative", delta), ("random", random_like(delta, cfg.seed))):
            vals, tasks = post_losses(cfg, model, tok, benign, orders, d)
            out[name] = paired_change(vals, clean)
            out[name + "_task"] = paired_change(tasks, clean_task)
        if args.report:  # the demo's own order again: the same Delta, the same run
            got = out["iterative"]["losses"][0] / report["results"]["iterative"]["val_loss"]
            out["report"]["reproduced_iterative"] = got - 1
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
