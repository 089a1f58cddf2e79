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

The traffic-statistics threshold comes from the same clean runs (both detectors run together in
one pass; they only observe, so each one's maxima are those it has alone) and the same reduction,
also at a design FPR a hundred times below the target (threshold 6.64): its calibration maxima
are close to Gumbel (3 of 300 above 5.0 where the fit expects 2.4), and the only setting it sees
(a one-shot w=1.0) scores 9 or more, so the larger margin costs nothing. It is stored under
"traffic" in the same record (`shipped_traffic`).

`ustats_calibration.json` holds each calibrated configuration: the config, the score settings,
the seeds, every per-run maximum and the threshold (per detector). Regenerate (about 2 s of one
CPU core per run of 50 steps, 11 minutes in all):

    python -m fastdume.defense.ustats_calibration --steps 50 --seeds 10000:10300 --write

A record applies only to the exact config and score settings it was made with; anything else
is calibrated in the report from its own clean runs (and says so).
"""

import argparse
import inspect
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from fastdume._atomic import write_json

from . import analysis, calibrate, sim
from .traffic import TrafficStats
from .update_stats import MIN_SCALE

DATA = Path(__file__).with_name("ustats_calibration.json")
HOOKS = "fastdume.defense.hooks:make_hooks"
# What a record's maxima were scored with (update_scores' defaults; a change invalidates them).
SCORE = {"window": 20, "min_history": 6, "max_period": 12, "repeats": 4, "min_scale": MIN_SCALE}
FPR, MARGIN, FLOOR = 0.01, 100.0, 3.0
# The traffic-statistics maxima of the same runs ("traffic" in a record): TrafficStats' defaults.
TRAFFIC_SCORE = {
    k: v.default
    for k, v in inspect.signature(TrafficStats.__init__).parameters.items()
    if k != "self"
}
TRAFFIC_MARGIN = 100.0


def clean_maxima(cfg, seeds, runner=None, progress=False, detectors=("update_stats", "traffic")):
    """{detector: per-run maximum score} of clean runs; the detectors run together in one pass
    (they only observe, so each one's scores are those it has alone)."""
    runner = runner or (lambda c, seed, spec, kw: sim.run(c, seed, spec, kw, val_batches=1))
    out = {d: [] for d in detectors}
    for seed in seeds:
        res = runner(cfg, seed, HOOKS, {"detectors": list(detectors)})
        for d in detectors:
            out[d].append(analysis.run_maximum(res["metrics"], d))
        if progress:
            got = ", ".join(f"{d} {out[d][-1]:.3f}" for d in detectors)
            print(f"  calibration seed {seed}: max score {got}", flush=True)
    return out


def threshold_from(maxima, fpr=FPR, margin=MARGIN, floor=FLOOR):
    return calibrate.tail_threshold(maxima, fpr, margin=margin, floor=floor)


def _fit(maxima, fpr, margin, floor):
    mu, beta = calibrate.gumbel_lmoments(maxima)
    return {
        "margin": margin,
        "floor": floor,
        "gumbel": {"mu": mu, "beta": beta},
        "threshold": threshold_from(maxima, fpr, margin, floor),
        "maxima": maxima,
    }


def build_record(cfg, seeds, maxima, fpr=FPR, margin=MARGIN, floor=FLOOR, traffic_margin=None):
    """A calibration record from clean_maxima's output for cfg and seeds (a range): the
    update-statistics fit at the top level, the traffic-statistics one under "traffic"."""
    seeds = range(seeds.start, seeds.stop)
    rnd = {d: [round(m, 6) for m in v] for d, v in maxima.items()}  # thresholds from what is stored
    rec = {
        "config": asdict(cfg),
        "score": dict(SCORE),
        "seeds": [seeds.start, seeds.stop],
        "runs": len(rnd["update_stats"]),
        "fpr": fpr,
        **_fit(rnd["update_stats"], fpr, margin, floor),
    }
    if "traffic" in rnd:
        tm = TRAFFIC_MARGIN if traffic_margin is None else traffic_margin
        rec["traffic"] = {"score": dict(TRAFFIC_SCORE), **_fit(rnd["traffic"], fpr, tm, floor)}
    return rec


def calibrate_clean(cfg, seeds, fpr=FPR, margin=MARGIN, floor=FLOOR, progress=False):
    """A calibration record (config, score settings, seeds, maxima, thresholds) for cfg: one
    pass of clean runs with both statistical detectors.

    seeds: a range of consecutive seeds (recorded as [first, stop]).
    """
    seeds = range(seeds.start, seeds.stop)
    return build_record(cfg, seeds, clean_maxima(cfg, seeds, progress=progress), fpr, margin, floor)


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


def shipped_traffic(cfg, fpr=FPR, path=DATA):
    """The shipped traffic-statistics calibration for exactly this config, TrafficStats' score
    settings and FPR: its fit plus the record's seeds and runs (None if none)."""
    key = asdict(replace(cfg, replicas=1))
    for rec in records(path):
        t = rec.get("traffic")
        if rec["config"] == key and rec["fpr"] == fpr and t and t["score"] == TRAFFIC_SCORE:
            return {"seeds": rec["seeds"], "runs": rec["runs"], "fpr": rec["fpr"], **t}
    return None


def _write(recs, path):
    write_json(path, {"records": recs}, indent=1)


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
    rec = calibrate_clean(cfg, range(a, b), progress=True)
    print(f"update statistics: threshold {rec['threshold']:.4f} from {rec['runs']} clean runs")
    print(f"traffic statistics: threshold {rec['traffic']['threshold']:.4f}")
    if args.write:
        same = lambda r: r["config"] == rec["config"] and r["fpr"] == rec["fpr"]
        _write([r for r in records() if not same(r)] + [rec], DATA)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
