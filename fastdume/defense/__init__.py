"""Detectors of a malicious pipeline stage, all running through the pipeline's stage hooks.

- UpdateAudit: replays each optimiser step and compares with the stage's parameters (exact).
- RecomputeSampler / PinnedRecompute: recompute sampled micro-batches of a stage's forward.
- UpdateStats: spikes and periodic patterns in per-stage update norms (threshold calibrated on
  300 clean runs and shipped: ustats_calibration.py).
- TrafficStats: running-average z-scores of activations sent and gradients received (threshold
  calibrated on the same 300 clean runs, shipped in the same file).
- ReplicaFingerprint: data-parallel replicas of a stage must stay bitwise equal.

Pipeline hook spec: "fastdume.defense.hooks:make_hooks". Measured against the attack by
fastdume.attack.defend.run_defense_report (`fastdume attack demo --defend`).
"""

from .audit import UpdateAudit, replay_step
from .hooks import DETECTORS, make_hooks
from .recompute import PinnedRecompute, RecomputeSampler, verify_recompute
from .replica import ReplicaFingerprint, replica_divergence
from .traffic import TrafficStats
from .update_stats import UpdateStats, update_scores

__all__ = [
    "DETECTORS",
    "PinnedRecompute",
    "RecomputeSampler",
    "ReplicaFingerprint",
    "TrafficStats",
    "UpdateAudit",
    "UpdateStats",
    "make_hooks",
    "replay_step",
    "replica_divergence",
    "update_scores",
    "verify_recompute",
]
