"""run_defense_report end to end on a tiny configuration: every detector measured, the audit's
target met, the table printed and the JSON written."""

import json

from _defense_fixtures import CFG, delta

from fastdume.attack.defend import ORDER, run_defense_report


def test_report_measures_every_detector_and_writes_json(tmp_path, capsys):
    settings = [
        ("one-shot w=1.0", dict(mode="oneshot", w=1.0, at_step=8)),
        ("iter lam=0.05 F=4", dict(mode="iterative", lam=0.05, every=4, start=6)),
    ]
    path = tmp_path / "defense.json"
    rep = run_defense_report(
        cfg=CFG,
        steps=14,
        seeds=2,
        attack_seeds=1,
        fpr=0.2,
        delta=delta(),
        settings=settings,
        json_path=path,
        attack_spec="fastdume.attack.inject:make_hooks",
        stat_heldout=2,
    )
    out = capsys.readouterr().out
    assert "one-shot w=1.0" in out and "clean runs" in out and "cost" in out
    assert json.loads(path.read_text())["attacks"].keys() == rep["attacks"].keys()
    for label, at in (("one-shot w=1.0", 8), ("iter lam=0.05 F=4", 6)):
        det = rep["attacks"][label]["detectors"]
        assert det["audit"]["rate"] == 1.0 and det["audit"]["first_step_median"] == at
        assert det["recompute"]["rate"] == 0.0  # blind to weight-only injection, by design
    assert rep["attacks"]["one-shot w=1.0"]["detectors"]["replica"]["first_step_median"] == 8
    assert rep["clean"]["audit"]["false_positives"] == 0
    # Statistical detectors: FPR over the held-out runs plus the extra ones; no shipped record
    # for this tiny config, so the threshold comes from the report's own clean runs.
    assert rep["clean"]["update_stats"]["runs"] == 4 and rep["clean"]["audit"]["runs"] == 2
    assert rep["threshold_sources"]["update_stats"].startswith("Gumbel fit, 2 clean runs")
    assert rep["clean"]["replica"]["false_positives"] == 0
    assert rep["targets"]["audit_first_step_zero_fp"] is True
    assert set(rep["cost"]) == set(ORDER)
    assert all(c["compute_share"] > 0 for c in rep["cost"].values())
