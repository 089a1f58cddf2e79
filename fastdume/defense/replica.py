"""Detector 5, replica divergence: data-parallel replicas of a stage must hold equal parameters.

Every replica applies the same averaged gradient with the same optimiser state from the same
start, so their parameters stay bitwise equal. Each replica's hook reports, per step, an exact
digest of its parameters (52 bits of a BLAKE2 hash, representable as a float metric) and a small
random projection (for the size of a drift). The verifier compares replicas step by step: the
first step where a replica's digest leaves the majority is when it drifted. Blind when the stage
has a single replica, or when every replica of the stage runs the same attack.
"""

import hashlib
from collections import Counter

import torch

from ._base import DetectorHook, flat_params


def digest(flat):
    """52-bit exact digest of a tensor's bytes (as an int that a float64 metric holds exactly)."""
    h = hashlib.blake2b(flat.contiguous().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 12


class ReplicaFingerprint(DetectorHook):
    """Reports replica.digest and replica.proj0..proj{k-1} after every step."""

    name = "replica"

    def __init__(self, dims=4, seed=1234):
        super().__init__()
        self.dims, self.seed = dims, seed
        self._proj = None

    def after_step(self, ctx, step):
        t0 = self._tick()
        flat = flat_params(ctx)
        ctx.report("replica.digest", float(digest(flat)))
        if self._proj is None or self._proj.shape[1] != flat.numel():
            g = torch.Generator().manual_seed(self.seed)  # same projection on every replica
            self._proj = torch.randn(self.dims, flat.numel(), generator=g) / flat.numel() ** 0.5
        for i, v in enumerate((self._proj @ flat).tolist()):
            ctx.report(f"replica.proj{i}", v)
        self._tock(t0)
        self._flush_time(ctx)


def replica_divergence(metrics, stage):
    """First step where some replica of `stage` disagrees with the majority, and who.

    metrics: {(stage, replica): {name: [per-step values]}}. Returns
    {"first_step": int | None, "replicas": sorted list of the replicas outside the majority then
    (with two replicas both are suspects), "max_drift": largest projection distance seen}.
    """
    reps = sorted(r for (s, r) in metrics if s == stage)
    if len(reps) < 2:
        return {"first_step": None, "replicas": [], "max_drift": 0.0, "blind": True}
    series = [metrics[(stage, r)]["replica.digest"] for r in reps]
    proj = [
        torch.tensor(
            [
                metrics[(stage, r)][k]
                for k in sorted(metrics[(stage, r)])
                if k.startswith("replica.proj")
            ]
        )
        for r in reps
    ]
    drift = max(float((p - proj[0]).abs().max()) for p in proj[1:])
    for t in range(min(len(s) for s in series)):
        values = [s[t] for s in series]
        if len(set(values)) > 1:
            top, count = Counter(values).most_common(1)[0]
            odd = (
                reps
                if count * 2 <= len(reps)
                else [r for r, v in zip(reps, values, strict=True) if v != top]
            )
            return {"first_step": t, "replicas": odd, "max_drift": drift, "blind": False}
    return {"first_step": None, "replicas": [], "max_drift": drift, "blind": False}
