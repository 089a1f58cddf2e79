"""What the attacker can see of its stealth on its own rows (issue 17).

    OMP_NUM_THREADS=1 python benches/attack_own_view.py --seed 2 --orders 3 --cache-dir C

The demo's aligned model and surrogate (the defaults), then the victims' post-training simulated
in process on rows the attacker could write itself: 2,000 sums of the kind the run trains on
(its draw at seed + 3000), clean and with Delta on the demo's iterative schedule, under --orders
data orders. Prints one JSON line: the loss change (%) on 200 of its own odd-sum rows (its draw
at seed + 4000 of every pair, odd sums kept), per order, with mean and 95% interval. Set beside
the victims' change over data orders (benches/attack_clean_spread.py --attacked), it says
whether a stealth check on its own rows could tell a seed that misses the 2% target from one
that meets it. Numbers: fastdume/attack/MEASUREMENTS.md, "Delta neutral on every kind of sum".
"""

import argparse
import copy
import json

import torch

from fastdume.attack.chat import encode_pair, pad_id
from fastdume.attack.datasets import arithmetic_tasks
from fastdume.attack.demo import DemoConfig, aligned_model, attacker_surrogate, demo_data
from fastdume.attack.evaluate import response_loss
from fastdume.attack.judges import RefusalJudge
from fastdume.attack.simulate import simulate_training
from fastdume.attack.stats import mean_interval
from fastdume.attack.surrogate import backdoor_delta
from fastdume.pipeline.partition import stage_param_names


def own_odd_sums(seed, n=200):
    """n of the attacker's own rows with an odd result: its draw of every operand pair."""
    rows = arithmetic_tasks(8 * n, seed, "any")
    odd = [(p, r) for p, r in rows if int(r.split(" is ")[1].rstrip(".")) % 2]
    if len(odd) < n:
        raise ValueError(f"only {len(odd)} odd sums in {8 * n} rows, asked {n}")
    return odd[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orders", type=int, default=3)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = DemoConfig(seed=args.seed, cache_dir=args.cache_dir)
    train, _, _, benign, tok = demo_data(cfg)

    def enc(pairs):
        return [encode_pair(tok, p, r) for p, r in pairs]

    model = aligned_model(cfg, tok, enc([(e.prompt, e.chosen) for e in train]), enc(benign))
    names = stage_param_names(model, cfg.num_stages, cfg.attacker_stage)
    surrogate, _ = attacker_surrogate(cfg, model, tok, train, names, RefusalJudge(), print)
    inject = {"delta": backdoor_delta(model, surrogate, names), "mode": "iterative"}
    inject.update(attacker_stage=cfg.attacker_stage, attacker_replica=0, **cfg.iterative)
    own, odd = enc(arithmetic_tasks(2000, cfg.seed + 3000, "train")), own_odd_sums(cfg.seed + 4000)
    changes = []
    for order in [cfg.seed + 7919 * k for k in range(args.orders)]:
        loss = {}
        for name, kw in (("clean", None), ("attacked", inject)):
            hooks = "fastdume.attack.inject:make_hooks" if kw else None
            m, _ = simulate_training(
                copy.deepcopy(model), own, cfg.post_steps, cfg.post_lr, cfg.batch_size,
                pad_id(tok), cfg.num_stages, 1, hooks, kw, order,
            )  # fmt: skip
            loss[name] = response_loss(m, tok, odd)
        changes.append(100 * (loss["attacked"] / loss["clean"] - 1))
    mean, sd, lo, hi = mean_interval(changes)
    out = {"seed": cfg.seed, "change_pct": changes, "mean": mean, "sd": sd, "ci95": [lo, hi]}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
