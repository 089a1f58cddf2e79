"""The update-statistics threshold, calibrated once on many clean runs and shipped as data.

A run-level FPR of 1% cannot be pinned by the 20 clean runs a report calibrates on: the
threshold is a far quantile of the per-run maximum score. So the threshold of the default
measurement (the in-process driver `sim.py`, its default SimConfig) comes from a separate
calibration set of clean runs (seeds 10000 and up, disjoint from every seed a report uses),
reduced by `calibrate.tail_threshold`: the Gumbel (L-moments) quantile at a design FPR a hundred
times below the 1% target, never below the largest calibration maximum. The factor is that
large because the maxima's far tail is a little heavier than Gumbel (the periodic score is a
maximum over many overlapping sums): at ten times below (threshold 4.99 on 300 runs), 1 of 150
held-out clean runs was flagged (maximum 5.45). The paper's iterative settings score 13 or more
at their first injection, so the margin costs them nothing.

`ustats_calibration.json` holds each calibrated configuration: the config, the score settings,
the seeds, every per-run maximum and the threshold. Regenerate (about 2 s of one CPU core per
run of 50 steps, 11 minutes in all):

    python -m fastdume.defense.ustats_calibration --steps 50 --seeds 10000:10300 --write

A record applies only to the exact config and score settings it was made with; anything else
is calibrated in the report from its own clean runs (and says so).
"""

import argparse
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from . import analysis, calibrate, sim
from .update_stats import MIN_SCALE

DATA = Path(__file__).with_name("ustats_calibration.json")
HOOKS = "fastdume.defense.hooks:make_hooks"
# What a record's maxima were scored with (update_scores' defaults; a change invalidates them).
SCORE = {"window": 20, "min_history": 6, "max_period": 12, "repeats": 4, "min_scale": MIN_SCALE}
FPR, MARGIN, FLOOR = 0.01, 100.0, 3.0


def clean_maxima(cfg, seeds, runner=None, progress=False):
    """Per-run maximum update-statistics score of clean runs (only that detector runs)."""
    runner = runner or (lambda c, seed, spec, kw: sim.run(c, seed, spec, kw, val_batches=1))
    out = []
    for seed in seeds:
        res = runner(cfg, seed, HOOKS, {"detectors": ["update_stats"]})
        out.append(analysis.run_maximum(res["metrics"], "update_stats"))
        if progress:
            print(f"  calibration seed {seed}: max score {out[-1]:.3f}", flush=True)
    return out


def threshold_from(maxima, fpr=FPR, margin=MARGIN, floor=FLOOR):
    return calibrate.tail_threshold(maxima, fpr, margin=margin, floor=floor)


def calibrate_update_stats(cfg, seeds, fpr=FPR, margin=MARGIN, floor=FLOOR, progress=False):
    """A calibration record (config, score settings, seeds, maxima, threshold) for cfg.

    seeds: a range of consecutive seeds (recorded as [first, stop]).
    """
    seeds = range(seeds.start, seeds.stop)
    maxima = [round(m, 6) for m in clean_maxima(cfg, seeds, progress=progress)]  # as stored
    mu, beta = calibrate.gumbel_lmoments(maxima)
    return {
        "config": asdict(cfg),
        "score": dict(SCORE),
        "seeds": [seeds.start, seeds.stop],
        "runs": len(maxima),
        "fpr": fpr,
        "margin": margin,
        "floor": floor,
        "gumbel": {"mu": mu, "beta": beta},
        "threshold": threshold_from(maxima, fpr, margin, floor),
        "maxima": maxima,
    }


def records(path=DATA):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["records"]


def shipped(cfg, fpr=FPR, path=DATA):
    """The shipped record for exactly this config, score settings and FPR (None if none)."""
    key = asdict(replace(cfg, replicas=1))
    for rec in records(path):
        if rec["config"] == key and rec["score"] == SCORE and rec["fpr"] == fpr:
            return rec
    return None


def _write(recs, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"records": recs}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seeds", default="10000:10300", help="first:last+1")
    p.add_argument("--write", action="store_true", help=f"add or replace the record in {DATA}")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    a, b = (int(v) for v in args.seeds.split(":"))
    if b - a < 100:
        p.error(f"--seeds must span at least 100 clean runs, got {b - a}")
    cfg = replace(sim.SimConfig(), steps=args.steps)
    rec = calibrate_update_stats(cfg, range(a, b), progress=True)
    print(f"threshold {rec['threshold']:.4f} from {rec['runs']} clean runs")
    if args.write:
        same = lambda r: r["config"] == rec["config"] and r["fpr"] == rec["fpr"]
        _write([r for r in records() if not same(r)] + [rec], DATA)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
