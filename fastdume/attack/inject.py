"""Step 3 of the attack: add Delta to the malicious stage's weights during post-training.

Used through the pipeline's hook spec ``"fastdume.attack.inject:make_hooks"``; the hook only
ever touches ``ctx.params`` of the stage it runs in, after the honest optimiser step.
"""

from dataclasses import dataclass

import torch

from fastdume.pipeline.hooks import StageHook

from .surrogate import load_delta

MODES = ("oneshot", "iterative")


@dataclass
class Schedule:
    """When and how much Delta is added after optimiser step `step`.

    oneshot: `scale` (w) once, at step `at`. iterative: `scale` (lambda) every `every` steps
    from `start` (inclusive) to `stop` (exclusive); `ramp` > 0 grows the coefficient linearly
    over the first `ramp` injections; `budget` caps the summed coefficients (total multiple of
    Delta injected), so a long run cannot overshoot into the clean behaviour.
    """

    mode: str = "iterative"
    scale: float = 0.05
    at: int = 0
    every: int = 10
    start: int = 0
    stop: int | None = None
    ramp: int = 0
    budget: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")

    def coefficients(self, num_steps):
        """The coefficient after each step 0..num_steps-1 (0.0 where nothing is added)."""
        out, total, k = [], 0.0, 0
        for step in range(num_steps):
            c = 0.0
            if self.mode == "oneshot":
                c = self.scale if step == self.at else 0.0
            elif step >= self.start and (self.stop is None or step < self.stop):
                if (step - self.start) % self.every == 0:
                    k += 1
                    c = self.scale * min(1.0, k / self.ramp) if self.ramp else self.scale
            if self.budget is not None:
                c = max(0.0, min(c, self.budget - total))
            total += c
            out.append(c)
        return out

    def coefficient(self, step):
        # the budget makes each coefficient depend on the ones before; keep them computed
        cached = self.__dict__.setdefault("_cache", [])
        if step >= len(cached):
            cached[:] = self.coefficients(max(step + 1, 2 * len(cached)))
        return cached[step]


class BackdoorInjection(StageHook):
    """After each optimiser step, adds coefficient(step) * Delta to the stage's parameters."""

    def __init__(self, delta, schedule):
        self.delta, self.schedule = delta, schedule
        self.injected = 0.0

    def after_step(self, ctx, step):
        coef = self.schedule.coefficient(step)
        if not coef:
            return
        outside = [n for n in self.delta if n not in ctx.params]
        if outside:
            raise ValueError(
                f"Delta names parameters outside stage {ctx.stage}: {outside[:3]}; "
                "the attacker may only change its own stage"
            )
        with torch.no_grad():
            for name, d in self.delta.items():
                p = ctx.params[name]
                p.add_(d.to(device=p.device, dtype=p.dtype), alpha=coef)
        self.injected += coef
        ctx.report("backdoor_coefficient", coef)


def make_hooks(
    stage,
    replica,
    num_stages,
    num_replicas,
    delta,
    attacker_stage=1,
    attacker_replica=0,
    **schedule,
):
    """Hook factory for the pipeline: the injection on the attacker's stage and replica only.

    delta: a safetensors path (or a dict name -> tensor); schedule: fields of Schedule.
    """
    if not 0 < attacker_stage < num_stages - 1:
        raise ValueError(
            f"attacker_stage must be an intermediate stage in 1..{num_stages - 2}, "
            f"got {attacker_stage}"
        )
    if not 0 <= attacker_replica < num_replicas:
        raise ValueError(
            f"attacker_replica must be in 0..{num_replicas - 1}, got {attacker_replica}"
        )
    if stage != attacker_stage or replica != attacker_replica:
        return []
    tensors = delta if isinstance(delta, dict) else load_delta(delta)
    return [BackdoorInjection(tensors, Schedule(**schedule))]
