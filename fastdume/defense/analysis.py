"""From the metrics a run returns to per-stage score series and decisions, one function per
detector. metrics: {(stage, replica): {name: [one value per step]}}."""

from .update_stats import update_scores


def stages_of(metrics, replica=0):
    return sorted(s for (s, r) in metrics if r == replica)


def audit_series(metrics, stage, replica=0):
    """Per-step audit flags (1.0 = a weight change the step does not explain)."""
    return list(metrics[(stage, replica)].get("audit.flag", []))


def update_series(metrics, stage, replica=0, **kwargs):
    """Per-step max(spike, periodic) score of the stage's update norms."""
    sc = update_scores(metrics[(stage, replica)]["ustats.lognorm"], **kwargs)
    return [max(a, b) for a, b in zip(sc["spike"], sc["periodic"], strict=True)]


def traffic_series(metrics, stage, replica=0):
    """Per-step max of the activation and gradient z-scores the stage saw."""
    m = metrics[(stage, replica)]
    return [max(a, g) for a, g in zip(m["traffic.act_z"], m["traffic.grad_z"], strict=True)]


SERIES = {"update_stats": update_series, "traffic": traffic_series}


def run_maximum(metrics, detector):
    """Largest score of a run over stages and steps (what calibration thresholds)."""
    fn = SERIES[detector]
    return max(max(fn(metrics, s), default=0.0) for s in stages_of(metrics))


def detector_seconds(metrics, detector):
    """Wall time a detector's hooks spent in a run, summed over stages and replicas."""
    key = {"update_stats": "ustats"}.get(detector, detector) + ".seconds"
    return sum(sum(m.get(key, [])) for m in metrics.values())
