"""Thresholds for the statistical detectors, calibrated on clean runs for a chosen run-level FPR.

A run is flagged when its largest score (over stages and steps) exceeds the threshold, so the
threshold is a high quantile of the per-run maximum on clean runs. Twenty clean runs cannot show
a 1% quantile directly; the maximum of many steps is close to Gumbel-distributed (extreme-value
theory), so the quantile comes from a Gumbel fit by moments, and never from below the empirical
(1 - fpr) quantile nor below `floor` (a score must at least be a `floor`-sigma event: with few
or very smooth clean runs the fit alone can collapse to zero). Held-out clean runs then measure
the FPR actually reached.
"""

import math

import torch

EULER_GAMMA = 0.5772156649015329


def gumbel_threshold(maxima, fpr, floor=0.0):
    """The (1 - fpr) quantile of a Gumbel fitted by moments to per-run maxima (at least floor)."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    x = torch.as_tensor(list(maxima), dtype=torch.float64)
    if x.numel() < 2:
        raise ValueError(f"maxima must hold at least 2 clean runs, got {x.numel()}")
    beta = max(float(x.std()) * math.sqrt(6.0) / math.pi, 1e-12)
    mu = float(x.mean()) - EULER_GAMMA * beta
    gumbel = mu - beta * math.log(-math.log1p(-fpr))
    return max(gumbel, float(torch.quantile(x, 1.0 - fpr)), float(floor))


def first_exceedance(scores, threshold):
    """First index with score > threshold (None if never)."""
    for t, v in enumerate(scores):
        if v > threshold:
            return t
    return None


def false_positive_rate(maxima, threshold):
    """Share of (clean) runs whose maximum exceeds the threshold."""
    maxima = list(maxima)
    return sum(m > threshold for m in maxima) / max(1, len(maxima))


def wilson_interval(k, n, z=1.96):
    """95% Wilson interval of a binomial proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))
