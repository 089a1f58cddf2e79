"""`fastdume attack demo --quick`: the whole flow runs and reports every row and target."""

import argparse
import json

import pytest
import torch

from fastdume.commands import attack


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_demo_through_the_cli_module(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="fastdume")
    attack.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "report.json"
    args = parser.parse_args(
        ["attack", "demo", "--quick", "--engine", "simulate", "--json", str(out)]
    )
    assert args.run(args) == 0
    report = json.loads(out.read_text())
    rows = ["aligned", "surrogate", "clean", "oneshot", "iterative", "iterative_R2"]
    rows += [r + "+safety" for r in rows[2:]]
    assert sorted(report["results"]) == sorted(rows)
    n = report["config"]["eval_prompts"]
    for name, r in report["results"].items():
        assert r["align_clean"]["n"] == r["align_trigger"]["n"] == n, name
        assert r["asr"]["k"] == n - r["align_trigger"]["k"]
        lo, hi = r["align_clean"]["ci95"]
        assert lo <= r["align_clean"]["pct"] <= hi
        assert 0 < r["val_loss"] < 20
    t = report["targets"]
    clean, it = report["results"]["clean"], report["results"]["iterative"]
    assert t["iterative"]["val_loss_change"]["value"] == pytest.approx(
        it["val_loss"] / clean["val_loss"] - 1
    )
    printed = capsys.readouterr().out
    assert all(name in printed for name in rows) and "persistence" in printed


def test_demo_rejects_an_unknown_engine():
    from fastdume.attack.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match="engine"):
        run_demo(DemoConfig(engine="mpi"))
