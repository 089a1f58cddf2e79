"""`fastdume eval --preset test --quick`: its numbers against independent recomputation."""

import contextlib
import io
import json
import math

import pytest
import torch
import transformers

import fastdume
from fastdume.cli import main

ARGS = ["--quick", "--eval-batches", "1", "--stats-tokens", "1000", "--router-steps", "4",
        "--full-steps", "1", "--no-progress", "--seed", "3", "--mixed-rows", "2",
        "--model-rows", "default,context:16/layer"]  # fmt: skip


@pytest.fixture(scope="module")
def ev(test_zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["eval", "--preset", "test", *ARGS, "--json", str(tmp / "e.json"),
                     "--plots", str(tmp / "plots")])  # fmt: skip
    assert code == 0
    return {**json.loads((tmp / "e.json").read_text()), "stdout": out.getvalue()}


def _test_batches(zoo, domain):
    from fastdume.data import batches, load_tokenizer

    return batches(load_tokenizer(), domain, "test", zoo.config["seq_len"], 8, 1, seed=3)


def _ppl(model, zoo, domain):
    from fastdume.data import eval_perplexity

    return eval_perplexity(model, _test_batches(zoo, domain))


def _default_whole_model():
    from fastdume.models.routing import check_options

    _, features, depth = check_options("model")
    return f"DUME whole model [{features}, {depth}, default]"


def test_methods_and_retention(ev, test_zoo):
    domains = test_zoo.domains
    expected = {"uniform averaging", "task arithmetic", "MoE oracle routing",
                "MoE random routing", "DUME k=1", "DUME k=2", "DUME+", "DUME+ k=2", "BTX-style",
                "DUME full FT", "whole-model oracle routing", _default_whole_model(),
                "DUME whole model [context:16, layer]"}  # fmt: skip
    assert set(ev["methods"]) == expected
    for name, m in ev["methods"].items():
        for d in domains:
            want = ev["cross"][d][d] / m["ppl"][d]
            assert math.isclose(m["retention"]["per_domain"][d], want, rel_tol=1e-12), name
        per = [m["retention"]["per_domain"][d] for d in domains]
        assert math.isclose(m["retention"]["mean"], sum(per) / len(per), rel_tol=1e-12)
        assert m["retention"]["worst"] == min(per)
        assert m["tokens_per_s"] > 0
    for name in ("DUME+", "DUME+ k=2", "BTX-style", "DUME full FT"):
        m = ev["methods"][name]
        assert m["weighting"] == ("topk" if name == "DUME+ k=2" else "st")
        assert all(math.isfinite(x) for x in ev["curves"][name])
        assert len(ev["curves"][name]) == m["steps"]
        scores = m["selection"]["scores"]  # validation score at step 0 and each checkpoint
        assert set(scores) == {"0", str(m["steps"] // 2), str(m["steps"])}
        assert scores[str(m["selection"]["step"])] == min(scores.values())
    assert "| DUME+ [st] |" in ev["stdout"]
    assert "plots skipped: matplotlib not installed" in ev["stdout"] or "plots:" in ev["stdout"]


def test_dense_and_dume_match_python_api(ev, test_zoo):
    zoo = test_zoo
    d0 = zoo.domains[0]
    dense = transformers.AutoModelForCausalLM.from_pretrained(zoo.experts[d0])
    for d in zoo.domains:
        assert math.isclose(ev["cross"][d0][d], _ppl(dense, zoo, d), rel_tol=1e-5)

    from fastdume.data import batches, load_tokenizer

    model = fastdume.upcycle([zoo.experts[d] for d in zoo.domains], domains=zoo.domains)
    stats = None
    for d in zoo.domains:
        train = batches(load_tokenizer(), d, "train", zoo.config["seq_len"], 8, seed=3)
        stats = fastdume.collect_stats(model, d, train, max_tokens=1000, stats=stats,
                                       progress=False)  # fmt: skip
    fastdume.fit_router(model, stats)
    d1 = zoo.domains[1]
    assert math.isclose(ev["methods"]["DUME k=1"]["ppl"][d1], _ppl(model, zoo, d1), rel_tol=1e-4)
    with fastdume.moe.forced_expert(model, 1):
        oracle = _ppl(model, zoo, d1)
    assert math.isclose(ev["methods"]["MoE oracle routing"]["ppl"][d1], oracle, rel_tol=1e-4)


def _whole_model(zoo, **options):
    from fastdume.data import batches, load_tokenizer

    model = fastdume.upcycle([zoo.experts[d] for d in zoo.domains], domains=zoo.domains,
                             routed="model", **options)  # fmt: skip
    stats = None
    for d in zoo.domains:
        train = batches(load_tokenizer(), d, "train", zoo.config["seq_len"], 8, seed=3)
        stats = fastdume.collect_stats(model, d, train, max_tokens=1000, stats=stats,
                                       progress=False)  # fmt: skip
    fastdume.fit_router(model, stats)
    return model


def test_whole_model_rows_match_python_api(ev, test_zoo):
    zoo = test_zoo
    # Oracle routing of the whole model is each dense expert itself.
    oracle = ev["methods"]["whole-model oracle routing"]["ppl"]
    for d in zoo.domains:
        assert math.isclose(oracle[d], ev["cross"][d][d], rel_tol=1e-4)
    rows = {_default_whole_model(): {}, "DUME whole model [context:16, layer]":
            {"features": "context:16", "depth": "layer"}}  # fmt: skip
    for name, options in rows.items():
        model = _whole_model(zoo, **options)
        m = ev["methods"][name]
        assert (m["routed"], m["features"], m["depth"]) == (
            "model", model.config.router_features, model.config.router_depth)  # fmt: skip
        for d in zoo.domains[1:3]:
            assert math.isclose(m["ppl"][d], _ppl(model, zoo, d), rel_tol=1e-4), (name, d)
        acc = m["routing"]
        assert all(len(acc[d]) == model.config.num_routers for d in zoo.domains)


def test_mixed_rows_are_scored_against_the_dense_experts(ev, test_zoo):
    ref = ev["mixed_reference"]
    assert set(ref) == set(test_zoo.domains)
    names = {n for n, m in ev["methods"].items() if "mixed" in m}
    assert names == {"uniform averaging", "task arithmetic", "DUME k=1", _default_whole_model(),
                     "DUME whole model [context:16, layer]"}  # fmt: skip
    for name in names:
        mixed = ev["methods"][name]["mixed"]
        assert len(mixed["pairs"]) == len(ref) * (len(ref) - 1)
        for pair, entry in mixed["pairs"].items():
            a, b = pair.split(">")
            ret = mixed["per_pair"][pair]
            assert ret["first"] == ref[a]["pairs"][pair]["ppl"]["first"] / entry["ppl"]["first"]
            assert ret["second"] == ref[b]["pairs"][pair]["ppl"]["second"] / entry["ppl"]["second"]
        routed = name.startswith("DUME")
        assert (mixed["curve"] is not None) == routed
        assert (mixed["second"]["routing"] is not None) == routed
    assert "### Mixed-domain rows" in ev["stdout"]


def test_routing_accuracy_dume_beats_random(ev, test_zoo):
    def mean(name):
        acc = ev["methods"][name]["routing"]
        vals = [v for d in acc for v in acc[d]]
        assert len(vals) == len(test_zoo.domains) * test_zoo.config["num_hidden_layers"]
        assert all(0.0 <= v <= 1.0 for v in vals)
        return sum(vals) / len(vals)

    assert mean("DUME k=1") > mean("MoE random routing") + 0.2


def test_task_arithmetic_alpha_is_the_validation_argmin(ev):
    ta = ev["methods"]["task arithmetic"]
    scores = {float(a): s for a, s in ta["validation_mean_log_ppl"].items()}
    assert ta["alpha"] == min(scores, key=scores.get)


def test_bad_flag_value_exits_2(capsys):
    assert main(["eval", "--preset", "test", "--quick", "--router-steps", "0"]) == 2
    assert "router_steps must be a positive int, got 0" in capsys.readouterr().err


def test_bad_model_row_exits_2_before_any_work(capsys):
    assert main(["eval", "--preset", "test", "--quick", "--model-rows", "context/deep"]) == 2
    assert "depth must be one of" in capsys.readouterr().err
    assert main(["eval", "--preset", "test", "--quick", "--mixed-rows", "-1"]) == 2
    assert "mixed_rows must be an int >= 0, got -1" in capsys.readouterr().err


def test_plot_without_matplotlib(monkeypatch, tmp_path, ev):
    import sys

    from fastdume.eval.report import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot(ev, tmp_path / "p") == []
    assert not (tmp_path / "p").exists()
    torch.manual_seed(0)
