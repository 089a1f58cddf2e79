"""Statistics over seeds: the mean with its Student-t 95% interval (no scipy at run time)."""

import math
import statistics


def t_density(x, df):
    """Student's t density with df degrees of freedom."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(t, df, intervals=400):
    """P(T <= t) by Simpson's rule on the density from 0 to |t| (error below 1e-6 for the
    quantiles used here, df >= 1, |t| <= 20)."""
    a = abs(t)
    h = a / intervals
    s = t_density(0.0, df) + t_density(a, df)
    s += sum((4 if i % 2 else 2) * t_density(i * h, df) for i in range(1, intervals))
    half = s * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


def t_quantile(p, df):
    """The p-quantile of Student's t (0.5 < p < 1), by bisection on t_cdf."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_interval(xs, level=0.95):
    """(mean, sample sd, lower, upper): the Student-t interval of the mean over independent
    values (seeds). One value: sd 0 and the interval is the value itself (no spread known).
    A NaN (a metric one seed's report lacks) makes all four NaN: that mean is unknown."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("xs must hold at least one value, got none")
    if any(math.isnan(x) for x in xs):
        return (math.nan,) * 4
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return mean, 0.0, mean, mean
    sd = statistics.stdev(xs)
    half = t_quantile(0.5 + level / 2, len(xs) - 1) * sd / math.sqrt(len(xs))
    return mean, sd, mean - half, mean + half
