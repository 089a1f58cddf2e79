"""The statistical detectors' thresholds calibrated on many clean runs (issue 9's 1% FPR target).

Fast: the shipped record is self-consistent (both thresholds, update and traffic statistics,
recomputed here from their maxima with an independent implementation), its first calibration
seed reproduces both maxima, held-out clean seeds stay below them, the paper's iterative setting
crosses the update-statistics one at the first injection and the large one-shot crosses the
traffic one. Slow (-m slow): FPR on 100 held-out clean seeds and detection of the attack settings.
"""

import inspect
import math

import numpy as np
import pytest
from _defense_fixtures import ATTACK_STAGE, DEMO_CFG, demo_run

from fastdume.attack import defend
from fastdume.defense import analysis, calibrate, ustats_calibration
from fastdume.defense.traffic import TrafficStats
from fastdume.defense.update_stats import update_scores

EULER_GAMMA = 0.5772156649015329
TRAFFIC_ONE_SHOT_DELAY = 1  # steps after the injection (measured: +1 on 5/5 seeds)


def _record():
    rec = ustats_calibration.shipped(DEMO_CFG, fpr=0.01)
    assert rec is not None, "no shipped update-statistics calibration for the demo config"
    return rec


def _independent_threshold(maxima, fpr, margin, floor):
    """Gumbel by L-moments (numpy), quantile at fpr / margin, never below the max or floor."""
    x = np.sort(np.asarray(maxima, dtype=np.float64))
    n = len(x)
    b0 = x.mean()
    b1 = np.mean(np.arange(n) / (n - 1) * x)
    beta = (2 * b1 - b0) / math.log(2)
    mu = b0 - EULER_GAMMA * beta
    q = mu - beta * math.log(-math.log(1 - fpr / margin))
    return max(q, x.max(), floor)


def test_shipped_threshold_is_recomputed_from_its_clean_maxima():
    rec = _record()
    defaults = {
        k: v.default
        for k, v in inspect.signature(update_scores).parameters.items()
        if k != "log_norms"
    }
    assert rec["score"] == defaults  # maxima scored with what the detector now computes
    assert rec["runs"] == len(rec["maxima"]) >= 100
    a, b = rec["seeds"]
    assert b - a == rec["runs"] and a >= 10_000  # disjoint from every seed a report uses
    expect = _independent_threshold(rec["maxima"], rec["fpr"], rec["margin"], rec["floor"])
    assert rec["threshold"] == pytest.approx(expect, rel=1e-9)
    assert rec["margin"] >= 10  # designed for an FPR ten times below the target
    assert ustats_calibration.threshold_from(rec["maxima"]) == pytest.approx(expect, rel=1e-9)


def _traffic_record():
    rec = ustats_calibration.shipped_traffic(DEMO_CFG, fpr=0.01)
    assert rec is not None, "no shipped traffic-statistics calibration for the demo config"
    return rec


def test_shipped_traffic_threshold_is_recomputed_from_its_clean_maxima():
    rec = _traffic_record()
    defaults = {
        k: v.default
        for k, v in inspect.signature(TrafficStats.__init__).parameters.items()
        if k != "self"
    }
    assert rec["score"] == defaults  # maxima scored with what the detector now computes
    assert rec["runs"] == len(rec["maxima"]) == len(_record()["maxima"]) >= 100  # the same runs
    a, b = rec["seeds"]
    assert b - a == rec["runs"] and a >= 10_000
    expect = _independent_threshold(rec["maxima"], rec["fpr"], rec["margin"], rec["floor"])
    assert rec["threshold"] == pytest.approx(expect, rel=1e-9)
    assert rec["margin"] >= 10
    assert rec["threshold"] > max(rec["maxima"])  # the fitted tail, not the largest run, rules


def test_shipped_maxima_reproduce_on_a_calibration_seed():
    rec = _record()
    m = demo_run(rec["seeds"][0])["metrics"]
    assert analysis.run_maximum(m, "update_stats") == pytest.approx(rec["maxima"][0], abs=1e-3)
    got = analysis.run_maximum(m, "traffic")
    assert got == pytest.approx(_traffic_record()["maxima"][0], abs=1e-3)


def test_shipped_threshold_holds_on_held_out_clean_seeds_and_catches_the_paper_setting():
    thr = _record()["threshold"]
    for seed in (0, 1):
        assert analysis.run_maximum(demo_run(seed)["metrics"], "update_stats") <= thr
    label = "iter lam=0.02 F=10"  # the weakest of the paper's iterative settings
    m = demo_run(0, label)["metrics"]
    sched = dict(defend.attack_settings(DEMO_CFG.steps))[label]
    first = calibrate.first_exceedance(analysis.update_series(m, ATTACK_STAGE), thr)
    assert first == defend.first_injection(sched)
    for s in analysis.stages_of(m):
        if s != ATTACK_STAGE:
            assert max(analysis.update_series(m, s)) <= thr


def test_shipped_traffic_threshold_holds_on_held_out_clean_seeds_and_sees_a_large_one_shot():
    thr = _traffic_record()["threshold"]
    for seed in (0, 1):
        assert analysis.run_maximum(demo_run(seed)["metrics"], "traffic") <= thr
    label = "one-shot w=1.0"
    m = demo_run(0, label)["metrics"]
    inj = defend.first_injection(dict(defend.attack_settings(DEMO_CFG.steps))[label])
    first = calibrate.first_exceedance(analysis.traffic_series(m, ATTACK_STAGE), thr)
    assert first is not None and inj <= first <= inj + TRAFFIC_ONE_SHOT_DELAY


def test_tail_threshold_reaches_a_one_percent_fpr_on_gumbel_like_maxima():
    rng = np.random.default_rng(4)
    maxima = rng.normal(size=(100_300, 50)).max(axis=1)  # maxima of 50 Gaussian scores
    calib, held = maxima[:300], maxima[300:]
    thr = calibrate.tail_threshold(calib, 0.01, margin=10)
    assert thr >= calib.max()
    observed = calibrate.false_positive_rate(held, thr)
    assert 1e-4 <= observed <= 0.01  # below the target, not uselessly far
    with pytest.raises(ValueError, match="at least 100"):
        calibrate.tail_threshold(calib[:20], 0.01)


def test_fpr_upper_bound_is_clopper_pearson():
    assert calibrate.fpr_upper_bound(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-6)
    # k events: P(Binomial(n, bound) <= k) = 5%.
    ub = calibrate.fpr_upper_bound(2, 120)
    assert calibrate.binomial_cdf(2, 120, ub) == pytest.approx(0.05, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["update_stats", "traffic"])
def test_fpr_on_100_held_out_clean_seeds(detector):
    rec = _record() if detector == "update_stats" else _traffic_record()
    thr = rec["threshold"]
    seeds = range(defend.STAT_HELDOUT_SEED, defend.STAT_HELDOUT_SEED + 100)  # the demo's
    maxima = [analysis.run_maximum(demo_run.__wrapped__(s)["metrics"], detector) for s in seeds]
    k = sum(m > thr for m in maxima)
    print(
        f"{detector}: {k}/100 held-out clean runs flagged, FPR 95% upper bound "
        f"{calibrate.fpr_upper_bound(k, 100):.3f}, largest max {max(maxima):.2f} vs {thr:.2f}"
    )
    assert k <= 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "label",
    [
        lab
        for lab, s in defend.attack_settings(DEMO_CFG.steps)
        if s["mode"] == "oneshot" or s["every"] > 1
    ],
)
def test_update_stats_catch_one_shot_and_paper_iterative_settings_at_the_first_injection(label):
    thr = _record()["threshold"]
    inj = defend.first_injection(dict(defend.attack_settings(DEMO_CFG.steps))[label])
    for seed in range(5):
        m = demo_run.__wrapped__(seed, label)["metrics"]
        first = calibrate.first_exceedance(analysis.update_series(m, ATTACK_STAGE), thr)
        assert first == inj


@pytest.mark.slow
def test_traffic_stats_catch_the_large_one_shot_on_every_seed():
    thr = _traffic_record()["threshold"]
    label = "one-shot w=1.0"
    inj = defend.first_injection(dict(defend.attack_settings(DEMO_CFG.steps))[label])
    for seed in range(5):
        m = demo_run.__wrapped__(seed, label)["metrics"]
        first = calibrate.first_exceedance(analysis.traffic_series(m, ATTACK_STAGE), thr)
        assert first is not None and inj <= first <= inj + TRAFFIC_ONE_SHOT_DELAY
