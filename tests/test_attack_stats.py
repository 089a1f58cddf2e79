"""Statistics over seeds: Student-t quantiles and the interval of the mean."""

import math

import numpy as np
import pytest

from fastdume.attack.stats import mean_interval, t_cdf, t_quantile

# two-sided 95% critical values of Student's t, from any printed t table
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 30: 2.042}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=6e-4)


def test_t_cdf_against_monte_carlo_of_its_definition():
    # T = Z / sqrt(chi2_df / df), sampled in float64 numpy
    rng = np.random.default_rng(0)
    df, n = 4, 400_000
    t = rng.standard_normal(n) / np.sqrt(rng.chisquare(df, n) / df)
    for x in (-2.0, 0.5, 1.5, 3.0):
        assert t_cdf(x, df) == pytest.approx((t <= x).mean(), abs=3e-3)


def test_mean_interval_by_hand():
    xs = np.random.default_rng(1).normal(50, 10, 5)
    mean, sd, lo, hi = mean_interval(xs.tolist())
    assert mean == pytest.approx(xs.mean()) and sd == pytest.approx(xs.std(ddof=1))
    half = T_TABLE[4] * xs.std(ddof=1) / np.sqrt(5)
    assert lo == pytest.approx(xs.mean() - half, rel=1e-3)
    assert hi == pytest.approx(xs.mean() + half, rel=1e-3)
    assert mean_interval([3.0]) == (3.0, 0.0, 3.0, 3.0)
    assert all(math.isnan(v) for v in mean_interval([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match="xs"):
        mean_interval([])
    with pytest.raises(ValueError, match="p must"):
        t_quantile(0.2, 3)
