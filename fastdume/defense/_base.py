"""Shared plumbing of the detector hooks: self-timing, so each detector reports its own cost."""

import time

import torch

from fastdume.pipeline.hooks import StageHook


class DetectorHook(StageHook):
    """A StageHook that times its own work and reports it once per step as `<name>.seconds`.

    The pipeline knows nothing of detectors, so the cost of a detector is measured by the
    detector itself: wall time spent in its hook methods, summed per step.
    """

    name = "detector"

    def __init__(self):
        self._seconds = 0.0

    def _tick(self):
        return time.perf_counter()

    def _tock(self, t0):
        self._seconds += time.perf_counter() - t0

    def _flush_time(self, ctx):
        ctx.report(f"{self.name}.seconds", self._seconds)
        self._seconds = 0.0


def stage_names(ctx):
    """The stage's parameter names in a fixed order (sorted, so every replica agrees)."""
    return sorted(ctx.params)


@torch.no_grad()
def flat_params(ctx, names=None, dtype=torch.float32):
    """One flat copy of the stage's parameters (a single pass over memory)."""
    names = stage_names(ctx) if names is None else names
    if not names:
        return torch.zeros(0, dtype=dtype)
    return torch.cat([ctx.params[n].detach().reshape(-1).to(dtype) for n in names])


def current_lr(ctx):
    """The learning rate the optimiser is about to use (first group; 0.0 when unknown)."""
    opt = ctx.optimizer
    if opt is None or not getattr(opt, "param_groups", None):
        return 0.0
    return float(opt.param_groups[0].get("lr", 0.0))
