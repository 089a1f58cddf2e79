"""The hook factory that puts detectors (and, for measurement, an attack) into a stage.

Spec for the pipeline: "fastdume.defense.hooks:make_hooks". Attack hooks come first, so the
detectors see what the stage holds after all of its own code ran.
"""

from fastdume.pipeline.hooks import load_hooks

from .audit import UpdateAudit
from .recompute import PinnedRecompute, RecomputeSampler
from .replica import ReplicaFingerprint
from .traffic import TrafficStats
from .update_stats import UpdateStats

DETECTORS = {
    "audit": UpdateAudit,
    "recompute": RecomputeSampler,
    "recompute_pinned": PinnedRecompute,
    "update_stats": UpdateStats,
    "traffic": TrafficStats,
    "replica": ReplicaFingerprint,
}


def make_hooks(
    stage,
    replica,
    num_stages,
    num_replicas,
    detectors=tuple(DETECTORS),
    detector_kwargs=None,
    attack=None,
    attack_kwargs=None,
):
    """Hooks of one stage process: the attack's (from its spec, if any), then the detectors'.

    detectors: names from DETECTORS; detector_kwargs: {name: kwargs}; attack: a hook-factory spec
    "package.module:factory" called with attack_kwargs.
    """
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise ValueError(f"detectors must be among {sorted(DETECTORS)}, got {unknown}")
    hooks = load_hooks(attack, stage, replica, num_stages, num_replicas, **(attack_kwargs or {}))
    kwargs = detector_kwargs or {}
    return hooks + [DETECTORS[d](**kwargs.get(d, {})) for d in detectors]
