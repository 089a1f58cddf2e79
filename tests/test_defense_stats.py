"""Update statistics, traffic statistics and calibration: scores against float64 references,
detectors fire on an injection and stay silent on held-out clean runs, calibration reaches the
requested false-positive rate."""

import math

import numpy as np
import pytest
from _defense_fixtures import ALL, ATTACK_STAGE, ITERATIVE, ITERATIVE_STEPS, run, sched

from fastdume.defense import analysis, calibrate
from fastdume.defense.update_stats import periodic_scores, spike_scores

CLEAN_CALIB, CLEAN_HELDOUT = (0, 1, 2), (3,)


def _np_spike(x, window, min_history, min_scale=0.02):
    d = np.concatenate([[0.0], np.diff(np.asarray(x, dtype=np.float64))])
    out = np.zeros(len(x))
    for t in range(1, len(x)):
        h = d[max(1, t - window) : t]
        if len(h) >= min_history:
            med = np.median(h)
            out[t] = (d[t] - med) / max(np.median(np.abs(h - med)) * 1.4826, min_scale)
    return out


def test_spike_scores_match_a_float64_reference():
    x = np.random.default_rng(1).normal(size=41)
    ref = _np_spike(x, window=9, min_history=9)  # odd windows: medians agree exactly
    got = spike_scores(x, window=9, min_history=9).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    # The scale floor binds where the changes are nearly equal (the MAD collapses).
    flat = np.cumsum(np.r_[0.0, np.full(12, -0.05), 0.01])
    got = spike_scores(flat, window=9, min_history=6, min_scale=0.02).numpy()
    assert got[-1] == pytest.approx((0.01 + 0.05) / 0.02, rel=1e-9)


def test_periodic_scores_pick_the_injection_period():
    z = np.random.default_rng(2).normal(size=60) * 0.5
    z[[20, 27, 34, 41]] += 2.5  # period 7, each too small to be a spike alone
    p = periodic_scores(z, max_period=12, repeats=4).numpy()
    assert p[41] == pytest.approx(math.sqrt(4) * z[[41, 34, 27, 20]].mean(), rel=1e-12)
    assert p[41] > 4.0 and p[41] > z.max()


def _threshold(detector):
    maxima = [analysis.run_maximum(run(s, ALL)["metrics"], detector) for s in CLEAN_CALIB]
    return calibrate.gumbel_threshold(maxima, fpr=0.01, floor=3.0)


def test_update_stats_fire_at_the_first_injection_and_are_silent_on_held_out_clean_runs():
    thr = _threshold("update_stats")
    for s in CLEAN_HELDOUT:
        assert analysis.run_maximum(run(s, ALL)["metrics"], "update_stats") <= thr
    m = run(0, ALL, ITERATIVE)["metrics"]
    series = analysis.update_series(m, ATTACK_STAGE)
    assert calibrate.first_exceedance(series, thr) == ITERATIVE_STEPS[0]
    assert all(series[t] > thr for t in ITERATIVE_STEPS)


def test_traffic_stats_fire_on_a_large_one_shot_and_are_silent_on_held_out_clean_runs():
    thr = _threshold("traffic")
    for s in CLEAN_HELDOUT:
        assert analysis.run_maximum(run(s, ALL)["metrics"], "traffic") <= thr
    m = run(0, ALL, sched(mode="oneshot", w=4.0, at_step=12))["metrics"]
    first = calibrate.first_exceedance(analysis.traffic_series(m, ATTACK_STAGE), thr)
    # The weights change after step 12, so the stage's traffic changes from step 13 on.
    assert first == 13


@pytest.mark.parametrize("fpr", [0.05, 0.2])
def test_gumbel_calibration_reaches_the_requested_fpr_on_held_out_runs(fpr):
    rng = np.random.default_rng(3)
    # Per-run maxima of 50 steps of Gaussian scores (what a clean run's maximum looks like).
    maxima = rng.normal(size=(6000, 50)).max(axis=1)
    calib, held = maxima[:40], maxima[40:]
    thr = calibrate.gumbel_threshold(calib, fpr)
    observed = calibrate.false_positive_rate(held, thr)
    # Within sampling error of 40 calibration runs, and not a uselessly high threshold.
    assert fpr / 2 <= observed <= 1.5 * fpr


def test_calibration_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fpr"):
        calibrate.gumbel_threshold([1.0, 2.0], 1.5)
    with pytest.raises(ValueError, match="maxima"):
        calibrate.gumbel_threshold([1.0], 0.1)
