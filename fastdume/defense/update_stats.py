"""Detector 3, update statistics: the size of each step's parameter update, over time.

Per stage and step the hook measures x_t = log(||theta_after - theta_before|| / lr_t): dividing by
the learning rate removes warmup and decay, so an honest AdamW run gives a nearly flat series.
Scores (pure functions, shared with calibration):
- spike: robust z of the change x_t - x_{t-1} against the median and MAD of the changes of the
  previous `window` steps, the scale (1.4826 MAD) never below `min_scale` (log units: 0.02 is a
  2% change of the update norm). Without that floor a few nearly equal changes early in
  training make the MAD collapse and honest runs score 10-15 sigmas (measured: 2 of 20 held-out
  clean runs flagged); with it, the per-run maximum of clean runs is close to Gumbel, so a
  threshold for a 1% run-level FPR can be calibrated (ustats_calibration.py);
- periodic: for each period F in [2, max_period], sqrt(K) * mean of the spike z at t, t-F, ...,
  t-(K-1)F; the maximum over F. Injection every F steps lines up; honest noise does not.
Cost: one flat copy of the stage's parameters and one subtraction per step (no extra traffic).
"""

import math

import torch

from ._base import DetectorHook, current_lr, flat_params

MIN_SCALE = 0.02


def spike_scores(x, window=20, min_history=6, min_scale=MIN_SCALE):
    """Robust z-score of each step's change d_t = x_t - x_{t-1} against the changes of the
    previous `window` steps (0 until min_history changes exist); the scale is
    max(1.4826 * MAD, min_scale).

    Changes rather than levels: early in training the level still drifts (Adam's normalised
    step shrinks), which would inflate a level-based spread and hide a jump.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    d = torch.zeros_like(x)
    d[1:] = x[1:] - x[:-1]
    z = torch.zeros_like(x)
    for t in range(1, len(x)):
        hist = d[max(1, t - window) : t]
        if len(hist) < min_history:
            continue
        med = hist.median()
        mad = (hist - med).abs().median() * 1.4826
        z[t] = (d[t] - med) / max(float(mad), min_scale)
    return z


def periodic_scores(z, max_period=12, repeats=4):
    """max over F of sqrt(repeats) * mean(z_t, z_{t-F}, ..., z_{t-(repeats-1)F})."""
    z = torch.as_tensor(z, dtype=torch.float64)
    out = torch.zeros_like(z)
    for t in range(len(z)):
        best = 0.0
        for f in range(2, max_period + 1):
            idx = [t - k * f for k in range(repeats)]
            if idx[-1] < 0:
                break
            best = max(best, float(z[idx].mean()) * math.sqrt(repeats))
        out[t] = best
    return out


def update_scores(
    log_norms, window=20, min_history=6, max_period=12, repeats=4, min_scale=MIN_SCALE
):
    """{'spike': [...], 'periodic': [...]} for one stage's series of log(update norm / lr)."""
    z = spike_scores(log_norms, window, min_history, min_scale)
    return {"spike": z.tolist(), "periodic": periodic_scores(z, max_period, repeats).tolist()}


class UpdateStats(DetectorHook):
    """Reports ustats.lognorm (log of update norm over lr) and ustats.cos (with the last update)."""

    name = "ustats"

    def __init__(self):
        super().__init__()
        self._before = None
        self._last = None

    def before_step(self, ctx, step):
        t0 = self._tick()
        self._before = flat_params(ctx)
        self._lr = current_lr(ctx) or 1.0
        self._tock(t0)

    def after_step(self, ctx, step):
        t0 = self._tick()
        u = flat_params(ctx) - self._before
        norm = float(torch.linalg.vector_norm(u))
        ctx.report("ustats.lognorm", math.log(norm / self._lr + 1e-30))
        cos = 0.0
        if self._last is not None and norm > 0:
            cos = float(
                torch.dot(u, self._last) / (norm * torch.linalg.vector_norm(self._last) + 1e-30)
            )
        ctx.report("ustats.cos", cos)
        self._last = u
        self._before = None
        self._tock(t0)
        self._flush_time(ctx)
