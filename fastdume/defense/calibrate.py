"""Thresholds for the statistical detectors, calibrated on clean runs for a chosen run-level FPR.

A run is flagged when its largest score (over stages and steps) exceeds the threshold, so the
threshold is a high quantile of the per-run maximum on clean runs. Twenty clean runs cannot show
a 1% quantile directly; the maximum of many steps is close to Gumbel-distributed (extreme-value
theory), so the quantile comes from a Gumbel fit by moments, and never from below the empirical
(1 - fpr) quantile nor below `floor` (a score must at least be a `floor`-sigma event: with few
or very smooth clean runs the fit alone can collapse to zero). Held-out clean runs then measure
the FPR actually reached.

`tail_threshold` is the calibration for many (>= 100) clean runs: the Gumbel is fitted by
L-moments (less swayed by one extreme run than moments) at a design FPR `margin` times below the
target, and the threshold is never below the largest calibration maximum (distribution-free: a
new clean run exceeds the largest of n exchangeable clean runs with probability 1 / (n + 1)).
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


def gumbel_lmoments(maxima):
    """(mu, beta) of a Gumbel fitted to the maxima by L-moments (probability-weighted moments)."""
    x = torch.as_tensor(sorted(maxima), dtype=torch.float64)
    n = x.numel()
    if n < 3:
        raise ValueError(f"maxima must hold at least 3 clean runs, got {n}")
    b0 = float(x.mean())
    b1 = float((torch.arange(n, dtype=torch.float64) / (n - 1) * x).mean())
    beta = max((2 * b1 - b0) / math.log(2.0), 1e-12)
    return b0 - EULER_GAMMA * beta, beta


def gumbel_quantile(mu, beta, fpr):
    """The value a Gumbel(mu, beta) exceeds with probability fpr."""
    return mu - beta * math.log(-math.log1p(-fpr))


def tail_threshold(maxima, fpr, margin=10.0, floor=0.0, min_runs=100):
    """Threshold for a run-level FPR from at least `min_runs` clean per-run maxima.

    max(Gumbel (L-moments) quantile at fpr / margin, largest calibration maximum, floor). With n
    runs the second term alone bounds the expected FPR by 1 / (n + 1); the first extrapolates the
    fitted tail to a design FPR well below the target.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    if margin < 1.0:
        raise ValueError(f"margin must be >= 1, got {margin}")
    maxima = [float(m) for m in maxima]
    if len(maxima) < min_runs:
        raise ValueError(
            f"tail calibration needs at least {min_runs} clean runs, got {len(maxima)}"
        )
    mu, beta = gumbel_lmoments(maxima)
    return max(gumbel_quantile(mu, beta, fpr / margin), max(maxima), float(floor))


def binomial_cdf(k, n, p):
    """P(Binomial(n, p) <= k)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def fpr_upper_bound(k, n, confidence=0.95):
    """One-sided Clopper-Pearson upper bound on a rate after k events in n runs
    (0 in n: 1 - (1 - confidence)^(1/n), about 3 / n at 95%)."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(100):  # bisection: P(Bin(n, p) <= k) falls as p rises
        mid = (lo + hi) / 2
        if binomial_cdf(k, n, mid) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return hi


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
