"""A stand-in injection hook (weight-only attacker) for developing and testing the detectors.

Same threat model as the attack: one stage (and one replica of it) adds a multiple of Delta to its
own parameters in `after_step`; everything it sends is then computed honestly from those weights.
"""

import torch

from fastdume.pipeline.hooks import StageHook


def injection_coefficient(step, mode, w=1.0, at_step=0, lam=0.02, every=10, start=0, stop=None):
    """How much of Delta is added after `step` (0.0 when nothing is)."""
    if mode == "oneshot":
        return float(w) if step == at_step else 0.0
    if mode == "iterative":
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        live = step >= start and (stop is None or step < stop)
        return float(lam) if live and (step - start) % every == 0 else 0.0
    raise ValueError(f"mode must be 'oneshot' or 'iterative', got {mode!r}")


class InjectionHook(StageHook):
    def __init__(self, delta, **schedule):
        self.delta, self.schedule = delta, schedule
        self.injected = []  # steps at which the weights were changed

    def after_step(self, ctx, step):
        coef = injection_coefficient(step, **self.schedule)
        if coef == 0.0:
            return
        with torch.no_grad():
            for n, d in self.delta.items():
                ctx.params[n].add_(d.to(ctx.params[n].dtype), alpha=coef)
        self.injected.append(step)


def injection_hooks(
    stage, replica, num_stages, num_replicas, delta, target_stage=2, target_replica=0, **schedule
):
    """Hook factory: the injection on (target_stage, target_replica) only, nothing elsewhere."""
    if stage == target_stage and replica == target_replica:
        return [InjectionHook(delta, **schedule)]
    return []
