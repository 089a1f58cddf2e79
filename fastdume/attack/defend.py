"""Measure every detector against the weight-injection attack: detection rate and first step per
attack setting, false positives on clean runs, and cost. `run_defense_report` is what
`fastdume attack demo --defend` calls."""

import statistics
import time
from contextlib import contextmanager
from dataclasses import replace

import torch

from fastdume import _atomic
from fastdume.defense import analysis, calibrate, sim
from fastdume.defense import ustats_calibration as ucal
from fastdume.defense.recompute import llama_stage_forward, verify_recompute
from fastdume.defense.replica import replica_divergence
from fastdume.pipeline.partition import split_layers

HOOKS = "fastdume.defense.hooks:make_hooks"
INJECT = "fastdume.attack.synthetic:injection_hooks"
STATISTICAL = ("update_stats", "traffic")
# Seeds: held-out clean runs 0.., the report's calibration 1000.., the statistical detectors'
# extra held-out clean runs 2000.., the shipped statistical calibration 10000...
STAT_HELDOUT_SEED = 2000
ORDER = ("audit", "recompute", "recompute_pinned", "update_stats", "traffic", "replica")


def attack_settings(steps, start=10):
    """(label, schedule) pairs: one-shot w, the paper's iterative lambda/F, and low-and-slow."""
    mid = steps // 2
    return [
        ("one-shot w=0.35", dict(mode="oneshot", w=0.35, at_step=mid)),
        ("one-shot w=1.0", dict(mode="oneshot", w=1.0, at_step=mid)),
        ("iter lam=0.02 F=10", dict(mode="iterative", lam=0.02, every=10, start=start)),
        ("iter lam=0.05 F=10", dict(mode="iterative", lam=0.05, every=10, start=start)),
        ("iter lam=0.1 F=10", dict(mode="iterative", lam=0.1, every=10, start=start)),
        ("iter lam=0.02 F=5", dict(mode="iterative", lam=0.02, every=5, start=start)),
        ("low-slow lam=0.002 F=1", dict(mode="iterative", lam=0.002, every=1, start=start)),
        ("low-slow lam=0.0005 F=1", dict(mode="iterative", lam=0.0005, every=1, start=start)),
    ]


ATTACK_HOOKS = "fastdume.attack.inject:make_hooks"


def attack_kwargs(spec, delta, stage, schedule):
    """Hook kwargs of the injection: the attack's own hook (7/9) or the synthetic stand-in."""
    if spec == INJECT:
        return dict(delta=delta, target_stage=stage, target_replica=0, **schedule)
    if spec == ATTACK_HOOKS:
        if schedule["mode"] == "oneshot":
            sched = dict(mode="oneshot", scale=schedule["w"], at=schedule["at_step"])
        else:
            sched = dict(
                mode="iterative",
                scale=schedule["lam"],
                every=schedule["every"],
                start=schedule.get("start", 0),
                stop=schedule.get("stop"),
            )
        return dict(delta=delta, attacker_stage=stage, attacker_replica=0, **sched)
    raise ValueError(f"attack_spec must be {INJECT!r} or {ATTACK_HOOKS!r}, got {spec!r}")


def first_injection(schedule):
    return schedule["at_step"] if schedule["mode"] == "oneshot" else schedule.get("start", 0)


@contextmanager
def _one_thread():
    # Tiny models on a shared CPU: one thread avoids oversubscription stalls.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Verifier:
    """Recomputation of the intermediate stages from the messages of a run."""

    def __init__(self, cfg):
        mc = sim._model_config(cfg)
        self.ranges = split_layers(cfg.layers, cfg.stages)
        self.forward = {
            s: llama_stage_forward(mc, self.ranges[s]) for s in range(1, cfg.stages - 1)
        }
        self.seconds = {}

    def first_steps(self, messages, prefix):
        t0 = time.perf_counter()
        out = {s: verify_recompute(messages, s, f, prefix=prefix) for s, f in self.forward.items()}
        self.seconds[prefix] = self.seconds.get(prefix, 0.0) + time.perf_counter() - t0
        return out


def _analyse_run(res, verifier, attack_stage):
    """Per detector that ran: first flagged step per stage (statistical ones: score series)."""
    m = res["metrics"]
    stages = analysis.stages_of(m)
    ran = set().union(*(mm.keys() for mm in m.values()))
    out = {}
    if "audit.flag" in ran:
        out["audit"] = {
            s: calibrate.first_exceedance(analysis.audit_series(m, s), 0.5) for s in stages
        }
    if "ustats.lognorm" in ran:
        out["update_stats"] = {s: analysis.update_series(m, s) for s in stages}
    if "traffic.act_z" in ran:
        out["traffic"] = {s: analysis.traffic_series(m, s) for s in stages}
    for prefix in ("recompute", "recompute_pinned"):
        if f"{prefix}.bytes" in ran:
            res_v = verifier.first_steps(res["messages"], prefix)
            out[prefix] = {s: r["first_step"] for s, r in res_v.items()}
    if "replica.digest" in ran and res["config"]["replicas"] > 1:
        out["replica"] = {s: replica_divergence(m, s)["first_step"] for s in stages}
    out["_seconds"] = {d: analysis.detector_seconds(m, d) for d in ORDER}
    out["_bytes"] = {
        p: sum(sum(mm.get(f"{p}.bytes", [])) for mm in m.values())
        for p in ("recompute", "recompute_pinned")
    }
    out["_train_seconds"] = res["train_seconds"]
    out["_val_loss"] = res["val_loss"]
    return out


def _decide(run, detector, thresholds):
    """{stage: first flagged step or None} for one analysed run."""
    per = run.get(detector)
    if per is None:
        return None
    if detector in STATISTICAL:
        return {s: calibrate.first_exceedance(v, thresholds[detector]) for s, v in per.items()}
    return per


def _summary_attack(runs, detector, thresholds, attack_stage, inject_at):
    decided = [_decide(r, detector, thresholds) for r in runs]
    if any(d is None for d in decided):
        return None
    firsts = [d.get(attack_stage) for d in decided]
    hits = [f for f in firsts if f is not None]
    others = sum(any(v is not None for s, v in d.items() if s != attack_stage) for d in decided)
    return {
        "detected": len(hits),
        "runs": len(runs),
        "rate": len(hits) / len(runs),
        "first_step_median": statistics.median(hits) if hits else None,
        "delay_median": statistics.median(h - inject_at for h in hits) if hits else None,
        "other_stages_flagged_runs": others,
    }


def _summary_clean(runs, detector, thresholds):
    decided = [_decide(r, detector, thresholds) for r in runs]
    if any(d is None for d in decided) or not runs:
        return None
    k = sum(any(v is not None for v in d.values()) for d in decided)
    return {
        "runs": len(runs),
        "false_positives": k,
        "fpr": k / len(runs),
        "ci95": calibrate.wilson_interval(k, len(runs)),
        "upper95": calibrate.fpr_upper_bound(k, len(runs)),
    }


def _training_bytes(cfg):
    """Bytes of one training step's traffic: activations forward and gradients back across every
    stage boundary, every micro-batch and replica (fp32, uncompressed)."""
    act = cfg.micro_batch * cfg.seq_len * cfg.hidden * 4
    return 2 * (cfg.stages - 1) * cfg.micro_batches * cfg.replicas * act


def _costs(runs, verify_seconds, cfg, detectors):
    """Extra compute (detector hook time + offline verification over training time) and extra
    traffic (bytes sent to a verifier over training traffic) per detector."""
    train = sum(r["_train_seconds"] for r in runs)
    traffic = _training_bytes(cfg) * cfg.steps * len(runs)
    out = {}
    for d in detectors:
        sec = sum(r["_seconds"][d] for r in runs) + verify_seconds.get(d, 0.0)
        sent = sum(r["_bytes"].get(d, 0.0) for r in runs)
        if d == "replica":  # one digest and the projection per replica and step
            sent = 8 * 5 * cfg.stages * cfg.replicas * cfg.steps * len(runs)
        out[d] = {"compute_share": sec / max(train, 1e-9), "traffic_share": sent / traffic}
    return out


def _run_many(runner, cfg, seeds, kwargs, verifier, attack_stage, desc, progress):
    out = []
    for seed in seeds:
        kw = dict(kwargs)
        dk = {d: dict(v) for d, v in kw.get("detector_kwargs", {}).items()}
        for d in ("recompute", "recompute_pinned"):
            dk.setdefault(d, {})["seed"] = seed  # the verifier's sampling, unknown to the stage
        kw["detector_kwargs"] = dk
        res = runner(cfg, seed, HOOKS, kw)
        out.append(_analyse_run(res, verifier, attack_stage))
        if progress:
            print(f"  {desc} seed {seed}: done", flush=True)
    return out


def run_defense_report(
    quick=False,
    seeds=None,
    attack_seeds=None,
    fpr=0.01,
    steps=None,
    attack_stage=2,
    delta=None,
    replicas=2,
    json_path=None,
    runner=None,
    verbose=True,
    progress=False,
    settings=None,
    score_floor=3.0,
    attack_spec=None,
    cfg=None,
    stat_heldout=None,
    ustats_calibration="shipped",
):
    """Run clean and attacked trainings with every detector on, calibrate, measure, print a table.

    quick: a few seeds and steps (tests, smoke runs). seeds: clean runs for calibration and
    as many held-out (default 20 each, quick 4). attack_seeds: runs per attack setting (5, quick
    2). delta: {param name: tensor} of the attacker's stage (default: a synthetic surrogate Delta
    on the in-process driver). runner(cfg, seed, hooks_spec, hooks_kwargs) -> dict with metrics,
    messages, train_seconds, val_loss (default: fastdume.defense.sim.run). replicas: R of the
    replica-divergence runs (R = 1 runs cannot see it). score_floor: the least threshold of the
    statistical detectors (z units). attack_spec: the injection hook factory (default: the
    attack's fastdume.attack.inject:make_hooks when present, else the synthetic stand-in).
    cfg: a fastdume.defense.sim.SimConfig (model and training sizes; steps overrides its steps).
    stat_heldout: extra held-out clean runs (seeds 2000 and up) with only the
    statistical detectors, so their FPR is measured on seeds + stat_heldout runs (default 100,
    quick 0). ustats_calibration: "shipped" takes each statistical detector's threshold
    (update and traffic statistics) from ustats_calibration.json when it holds a record for
    exactly this config and score settings on the in-process driver (many clean runs; see
    ustats_calibration.py), else calibrates it from the `seeds` calibration runs; "report"
    always does the latter.
    Returns the numbers as a dict.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    if ustats_calibration not in ("shipped", "report"):
        raise ValueError(
            f"ustats_calibration must be 'shipped' or 'report', got {ustats_calibration!r}"
        )
    if replicas < 2:
        raise ValueError(f"replicas must be >= 2 for the replica runs, got {replicas}")
    t_start = time.perf_counter()
    seeds = seeds or (4 if quick else 20)
    attack_seeds = attack_seeds or (2 if quick else 5)
    stat_heldout = (0 if quick else 100) if stat_heldout is None else stat_heldout
    use_shipped = ustats_calibration == "shipped"
    sim_driver = runner is None
    cfg = cfg or sim.SimConfig()
    cfg = replace(cfg, steps=steps or (30 if quick else 50))
    runner = runner or (lambda c, seed, spec, kw: sim.run(c, seed, spec, kw))
    attack_spec = attack_spec or ATTACK_HOOKS
    with _one_thread():
        delta = delta if delta is not None else sim.synthetic_delta(cfg, stage=attack_stage)
        verifier = _Verifier(cfg)
        dets = [d for d in ORDER if d != "replica"]
        base_kw = {
            "detectors": dets,
            "detector_kwargs": {"recompute": {"rate": 0.25}, "recompute_pinned": {"rate": 0.25}},
        }
        run = lambda c, s, kw, desc: _run_many(
            runner, c, s, kw, verifier, attack_stage, desc, progress
        )
        calib = run(cfg, range(1000, 1000 + seeds), base_kw, "calibration")
        thresholds = {
            d: calibrate.gumbel_threshold(
                [max(max(v, default=0.0) for v in r[d].values()) for r in calib],
                fpr,
                floor=score_floor,
            )
            for d in STATISTICAL
        }
        sources = {d: f"Gumbel fit, {seeds} clean runs of this report" for d in STATISTICAL}
        for d, rec in (
            ("update_stats", ucal.shipped(cfg, fpr)),
            ("traffic", ucal.shipped_traffic(cfg, fpr)),
        ):
            if use_shipped and sim_driver and rec is not None:
                thresholds[d] = rec["threshold"]
                a, b = rec["seeds"]
                sources[d] = (
                    f"shipped: {rec['runs']} clean runs (seeds {a}..{b - 1}), "
                    f"Gumbel tail at FPR {rec['fpr'] / rec['margin']:g}, >= their max"
                )
        clean = run(cfg, range(seeds), base_kw, "clean")
        stat_kw = {"detectors": list(STATISTICAL)}
        extra = range(STAT_HELDOUT_SEED, STAT_HELDOUT_SEED + stat_heldout)
        stat_clean = run(cfg, extra, stat_kw, "clean (statistical)")
        settings = settings or attack_settings(cfg.steps)
        attacks = {}
        for label, sched in settings:
            kw = dict(
                base_kw,
                attack=attack_spec,
                attack_kwargs=attack_kwargs(attack_spec, delta, attack_stage, sched),
            )
            runs = run(cfg, range(attack_seeds), kw, label)
            attacks[label] = (sched, runs)
        # Replica divergence needs R >= 2 (every replica of every stage fingerprints itself).
        rcfg = replace(cfg, replicas=replicas)
        rkw = {"detectors": ["audit", "replica"]}
        # Digests are exact, so fewer clean seeds suffice here (each run costs R trainings).
        rclean = run(rcfg, range(max(2, seeds // 4)), rkw, f"clean R={replicas}")
        rattacks = {}
        for label, sched in settings[:1] + settings[2:3] + settings[6:7]:
            kw = dict(
                rkw,
                attack=attack_spec,
                attack_kwargs=attack_kwargs(attack_spec, delta, attack_stage, sched),
            )
            rattacks[label] = (sched, run(rcfg, range(max(1, attack_seeds // 2)), kw, label))
    report = _assemble(
        cfg, rcfg, fpr, thresholds, clean, attacks, rclean, rattacks, verifier, attack_stage, calib
    )
    report["threshold_sources"] = sources
    for d in STATISTICAL:  # the statistical detectors' FPR over every held-out clean run
        report["clean"][d] = _summary_clean(clean + stat_clean, d, thresholds)
    report["targets"] = _targets(report)
    report["wall_seconds"] = time.perf_counter() - t_start
    if verbose:
        print_report(report)
    if json_path:
        write_json(report, json_path)
    return report


def _assemble(cfg, rcfg, fpr, thresholds, clean, attacks, rclean, rattacks, verifier, stage, calib):
    dets = [d for d in ORDER if d != "replica"]
    clean_sum = {d: _summary_clean(clean, d, thresholds) for d in dets}
    clean_sum["replica"] = _summary_clean(rclean, "replica", thresholds)
    clean_loss = statistics.mean(r["_val_loss"] for r in clean)
    out_attacks = {}
    for label, (sched, runs) in attacks.items():
        inj = first_injection(sched)
        det = {d: _summary_attack(runs, d, thresholds, stage, inj) for d in dets}
        if label in rattacks:
            det["replica"] = _summary_attack(rattacks[label][1], "replica", thresholds, stage, inj)
        out_attacks[label] = {
            "schedule": dict(sched),
            "first_injection_step": inj,
            "val_loss_change": statistics.mean(r["_val_loss"] for r in runs) / clean_loss - 1,
            "detectors": det,
        }
    r1_runs = calib + clean + [r for _, rs in attacks.values() for r in rs]
    costs = _costs(r1_runs, verifier.seconds, cfg, dets)
    rruns = rclean + [r for _, rs in rattacks.values() for r in rs]
    costs["replica"] = _costs(rruns, {}, rcfg, ["replica"])["replica"]
    report = {
        "device": "cpu (in-process pipeline driver fastdume.defense.sim, tiny Llama)",
        "config": {k: v for k, v in vars(cfg).items()} if hasattr(cfg, "__dict__") else cfg,
        "attack_stage": stage,
        "fpr_target": fpr,
        "thresholds": thresholds,
        "clean": clean_sum,
        "attacks": out_attacks,
        "cost": costs,
    }
    report["targets"] = _targets(report)
    return report


def _targets(rep):
    """Check the issue's two targets on the measured numbers."""
    audit_ok = rep["clean"]["audit"]["false_positives"] == 0 and all(
        a["detectors"]["audit"]["rate"] == 1.0 and a["detectors"]["audit"]["delay_median"] == 0
        for a in rep["attacks"].values()
    )
    iterative = [
        a
        for a in rep["attacks"].values()
        if a["schedule"]["mode"] == "iterative" and a["schedule"]["every"] > 1
    ]
    cheap = []
    for d in STATISTICAL:
        ok = (
            rep["cost"][d]["compute_share"] < 0.05
            and rep["clean"][d]["fpr"] <= rep["fpr_target"]
            and all(a["detectors"][d]["rate"] == 1.0 for a in iterative)
        )
        if ok:
            cheap.append(d)
    return {
        "audit_first_step_zero_fp": audit_ok,
        "cheap_statistical_detectors_meeting_target": cheap,
    }


def _cell(s):
    if s is None:
        return "-"
    delay = "" if s["delay_median"] is None else f" +{s['delay_median']:g}"
    return f"{s['detected']}/{s['runs']}{delay}"


def print_report(rep):
    cols = list(ORDER)
    w = 18
    print(
        f"Detectors vs a weight-injection attacker on stage {rep['attack_stage']} "
        f"({rep['device']}); cell = detected/runs +median delay in steps"
    )
    print("setting".ljust(26) + "".join(c.rjust(w) for c in cols) + "  dloss")
    for label, a in rep["attacks"].items():
        cells = [_cell(a["detectors"].get(c)) for c in cols]
        print(
            label.ljust(26)
            + "".join(x.rjust(w) for x in cells)
            + f"  {100 * a['val_loss_change']:+.2f}%"
        )
    fp = []
    for c in cols:
        s = rep["clean"].get(c)
        fp.append("-" if s is None else f"{s['false_positives']}/{s['runs']} FP")
    print("clean runs".ljust(26) + "".join(x.rjust(w) for x in fp))
    cost = [
        f"{100 * rep['cost'][c]['compute_share']:.1f}%cpu "
        f"{100 * rep['cost'][c]['traffic_share']:.0f}%net"
        for c in cols
    ]
    print("cost".ljust(26) + "".join(x.rjust(w) for x in cost))
    print(f"thresholds (calibrated for run-level FPR {rep['fpr_target']:g}):")
    for k, v in rep["thresholds"].items():
        src = rep.get("threshold_sources", {}).get(k, "")
        c = rep["clean"][k]
        print(
            f"  {k} {v:.2f} ({src}); held-out clean: {c['false_positives']}/{c['runs']} flagged,"
            f" FPR 95% upper bound {100 * c['upper95']:.1f}%"
        )
    print(f"targets: {rep['targets']}")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if torch.is_tensor(x):
        return x.tolist()
    return x


def write_json(report, path):
    """Write the report through a temporary name, so a crash never leaves half a file."""
    _atomic.write_json(path, _jsonable(report))


# --- the detectors inside `fastdume attack demo`'s own post-training runs (issue 17) ---------
DEMO_DETECTORS = ("audit", "update_stats", "traffic")


def demo_hooks(attack_kwargs=None, detectors=DEMO_DETECTORS):
    """(spec, kwargs) of a pipeline run with the detectors on every stage and, with
    attack_kwargs (fastdume.attack.inject:make_hooks's), the attack on its stage before them."""
    kwargs = {"detectors": list(detectors)}
    if attack_kwargs is not None:
        kwargs.update(attack=ATTACK_HOOKS, attack_kwargs=dict(attack_kwargs))
    return HOOKS, kwargs


def demo_scores(summary):
    """Per detector and stage of one pipeline run (its launch summary): the audit's first
    flagged step, and the statistical detectors' score series (replica 0)."""
    m = {(r["stage"], r["replica"]): r["metrics"] for r in summary["ranks"].values()}
    stages = analysis.stages_of(m)
    out = {}
    if any("audit.flag" in mm for mm in m.values()):
        out["audit"] = {
            s: calibrate.first_exceedance(analysis.audit_series(m, s), 0.5) for s in stages
        }
    if any("ustats.lognorm" in mm for mm in m.values()):
        out["update_stats"] = {s: analysis.update_series(m, s) for s in stages}
    if any("traffic.act_z" in mm for mm in m.values()):
        out["traffic"] = {s: analysis.traffic_series(m, s) for s in stages}
    return out


def demo_detections(reports, attack_stage, runs=("oneshot", "iterative")):
    """Over the demo's seeds: which detectors catch the attack, on which stage, at what step.

    reports: demo reports whose "detectors" hold demo_scores per run (clean and attacked).
    The audit has no threshold (exact replay). The statistical detectors are thresholded at the
    largest score any clean run of these seeds reached on any stage (so the clean runs are
    flagged 0 times by construction; with this few clean runs it bounds nothing about the false
    positive rate, see the defence report for calibrated thresholds).
    """
    clean = [r["detectors"]["clean"] for r in reports]
    thresholds = {
        d: max(max(max(v, default=0.0) for v in c[d].values()) for c in clean)
        for d in STATISTICAL
        if all(d in c for c in clean)
    }
    out = {"thresholds": thresholds, "runs": {}}
    for name in ("clean", *runs):
        rows = []
        for rep in reports:
            sc = rep["detectors"][name]
            first = {}
            for d, per in sc.items():
                if d in STATISTICAL:
                    per = {s: calibrate.first_exceedance(v, thresholds[d]) for s, v in per.items()}
                first[d] = {int(s): f for s, f in per.items()}
            rows.append({"seed": rep["config"]["seed"], "first_step": first})
        out["runs"][name] = rows
    out["audit_at_first_injection"] = {
        name: [
            r["first_step"].get("audit", {}).get(attack_stage) == _first_injection(rep, name)
            for r, rep in zip(out["runs"][name], reports, strict=True)
        ]
        for name in runs
    }
    return out


def _first_injection(report, run):
    """The first step after which the demo's schedule `run` adds Delta."""
    from .inject import Schedule

    cfg = report["config"]
    coefs = Schedule(mode=run, **cfg[run]).coefficients(cfg["post_steps"])
    return next((i for i, c in enumerate(coefs) if c), None)


def format_detections(det, attack_stage):
    lines = ["detectors in the demo's pipeline runs: first flagged step on the attacker's stage "
             f"{attack_stage} per seed (other stages flagged: count)"]  # fmt: skip
    for d, t in det["thresholds"].items():
        lines.append(f"  {d} threshold {t:.2f} (the largest score of any clean run)")
    for name, rows in det["runs"].items():
        cells = []
        for d in rows[0]["first_step"]:
            steps = [r["first_step"][d].get(attack_stage) for r in rows]
            others = sum(
                v is not None for r in rows for s, v in r["first_step"][d].items()
                if s != attack_stage
            )  # fmt: skip
            cells.append(f"{d} {steps} (others {others})")
        lines.append(f"  {name:<10} " + "; ".join(cells))
    for name, ok in det.get("audit_at_first_injection", {}).items():
        lines.append(f"  audit flags {name} at its first injection step: {sum(ok)}/{len(ok)} seeds")
    return "\n".join(lines)
