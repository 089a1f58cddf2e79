"""Shared tiny runs of the in-process pipeline driver for the defence tests (cached per session)."""

import functools

import torch

from fastdume.defense import sim

HOOKS = "fastdume.defense.hooks:make_hooks"
INJECT = "fastdume.attack.synthetic:injection_hooks"
CFG = sim.SimConfig(
    hidden=32, inter=64, steps=24, pretrain_steps=30, seq_len=16, micro_batch=2, warmup=3
)
ATTACK_STAGE = 2
ALL = ("audit", "recompute", "recompute_pinned", "update_stats", "traffic")
ITERATIVE = (("every", 6), ("lam", 0.05), ("mode", "iterative"), ("start", 8))
ITERATIVE_STEPS = (8, 14, 20)


def delta():
    return sim.synthetic_delta(CFG, stage=ATTACK_STAGE, steps=30)


@functools.lru_cache(maxsize=32)
def run(seed, detectors, attack=None, replicas=1, attack_after=False, rate=0.5):
    """One run with the given detectors; attack: tuple(sorted(schedule.items())) or None."""
    cfg = sim.SimConfig(**{**vars(CFG), "replicas": replicas}) if replicas != 1 else CFG
    kw = {
        "detectors": list(detectors),
        "detector_kwargs": {
            "recompute": {"rate": rate, "seed": seed},
            "recompute_pinned": {"rate": rate, "seed": seed},
        },
    }
    if attack is not None:
        akw = dict(delta=delta(), target_stage=ATTACK_STAGE, target_replica=0, **dict(attack))
        if attack_after:
            kw = {**kw, "attack": None}
            spec = "_defense_fixtures:attack_after_detectors"
            return _run(cfg, seed, spec, {"inner": kw, "attack_kwargs": akw})
        kw.update(attack=INJECT, attack_kwargs=akw)
    return _run(cfg, seed, HOOKS, kw)


def _run(cfg, seed, spec, kw):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU
    try:
        return sim.run(cfg, seed, spec, kw)
    finally:
        torch.set_num_threads(n)


def attack_after_detectors(stage, replica, num_stages, num_replicas, inner, attack_kwargs):
    """Detectors first, then the injection: the audit must catch it at the next before_step."""
    from fastdume.attack.synthetic import injection_hooks
    from fastdume.defense.hooks import make_hooks

    hooks = make_hooks(stage, replica, num_stages, num_replicas, **inner)
    return hooks + injection_hooks(stage, replica, num_stages, num_replicas, **attack_kwargs)


def sched(**kw):
    return tuple(sorted(kw.items()))


# The default measurement's configuration (`fastdume attack demo --defend`, full): the shipped
# statistical calibration (fastdume/defense/ustats_calibration.json) belongs to it.
DEMO_CFG = sim.SimConfig(steps=50)


@functools.lru_cache(maxsize=16)
def demo_run(seed, attack=None):
    """One run of the default config with the two statistical detectors (update and traffic
    statistics, as in their calibration); attack: a label of
    fastdume.attack.defend.attack_settings (the attack's own injection hook, stage 2)."""
    from fastdume.attack import defend

    kw = {"detectors": ["update_stats", "traffic"]}
    if attack is not None:
        sch = dict(defend.attack_settings(DEMO_CFG.steps))[attack]
        spec = defend.ATTACK_HOOKS
        d = sim.synthetic_delta(DEMO_CFG, stage=ATTACK_STAGE)
        kw.update(attack=spec, attack_kwargs=defend.attack_kwargs(spec, d, ATTACK_STAGE, sch))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sim.run(DEMO_CFG, seed, HOOKS, kw, val_batches=1)
    finally:
        torch.set_num_threads(n)
