"""`fastdume demo --preset test`: its numbers against the same steps done with the Python API."""

import contextlib
import io
import json
import math

import pytest
import torch
import transformers

import fastdume
from fastdume.cli import main

ARGS = ["--stats-tokens", "3000", "--eval-batches", "2", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def demo(test_zoo, tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["demo", "--preset", "test", *ARGS, "--json", str(path)]) == 0
    return {**json.loads(path.read_text()), "stdout": out.getvalue()}


def _batches(zoo, domain, split, cap):
    from fastdume.data import batches, load_tokenizer

    return batches(load_tokenizer(), domain, split, zoo.config["seq_len"], 8, max_batches=cap)


def _ppl(model, zoo, domain):
    from fastdume.data import eval_perplexity

    return eval_perplexity(model, _batches(zoo, domain, "validation", 2))


def test_demo_table_matches_python_api(demo, test_zoo, capsys):
    zoo = test_zoo
    assert demo["domains"] == zoo.domains
    rows = demo["perplexity"]
    assert set(rows) == {*(f"dense expert: {d}" for d in zoo.domains), "uniform averaging", "DUME",
                         "DUME whole model"}  # fmt: skip
    d0 = zoo.domains[0]
    dense = transformers.AutoModelForCausalLM.from_pretrained(zoo.experts[d0])
    assert math.isclose(rows[f"dense expert: {d0}"][d0], _ppl(dense, zoo, d0), rel_tol=1e-5)

    # uniform averaging, rebuilt here from the checkpoints in float64
    states = [
        transformers.AutoModelForCausalLM.from_pretrained(zoo.experts[d]).state_dict()
        for d in zoo.domains
    ]
    with torch.no_grad():
        for k, v in dense.state_dict().items():
            v.copy_(sum(s[k].double() for s in states) / len(states))
    d1 = zoo.domains[1]
    assert math.isclose(rows["uniform averaging"][d1], _ppl(dense, zoo, d1), rel_tol=1e-4)

    # DUME: upcycle, oracle statistics on the same training batches, closed-form fit
    model = fastdume.upcycle([zoo.experts[d] for d in zoo.domains], domains=zoo.domains)
    stats = None
    for d in zoo.domains:
        stats = fastdume.collect_stats(
            model, d, _batches(zoo, d, "train", None), max_tokens=3000, stats=stats, progress=False
        )
    fastdume.fit_router(model, stats)
    for d in zoo.domains:
        assert math.isclose(rows["DUME"][d], _ppl(model, zoo, d), rel_tol=1e-4)
    assert demo["stats_tokens"] == {d: 3000 for d in zoo.domains}


def _whole_model(zoo):
    """The whole-model DUME (routed="model", default options) built with the Python API."""
    model = fastdume.upcycle([zoo.experts[d] for d in zoo.domains], domains=zoo.domains,
                             routed="model")  # fmt: skip
    stats = None
    for d in zoo.domains:
        stats = fastdume.collect_stats(
            model, d, _batches(zoo, d, "train", None), max_tokens=3000, stats=stats, progress=False
        )
    fastdume.fit_router(model, stats)
    return model


def test_demo_whole_model_row_and_retention_match_python_api(demo, test_zoo):
    from fastdume.models.routing import check_options

    zoo = test_zoo
    whole = _whole_model(zoo)
    routed, features, depth = check_options("model")
    assert demo["whole_model"] == {"routed": routed, "features": features, "depth": depth}
    own = {}
    for d in zoo.domains:
        dense = transformers.AutoModelForCausalLM.from_pretrained(zoo.experts[d])
        own[d] = _ppl(dense, zoo, d)
    ret = demo["retention"]
    assert set(ret) == set(demo["perplexity"])
    for d in zoo.domains:
        ppl = _ppl(whole, zoo, d)
        assert math.isclose(demo["perplexity"]["DUME whole model"][d], ppl, rel_tol=1e-4)
        assert math.isclose(ret["DUME whole model"]["per_domain"][d], own[d] / ppl, rel_tol=1e-4)
        assert math.isclose(ret[f"dense expert: {d}"]["per_domain"][d], 1.0, rel_tol=1e-12)
    per = ret["DUME whole model"]["per_domain"]
    assert math.isclose(ret["DUME whole model"]["mean"], sum(per.values()) / len(per))
    # The printed retention table shows the same numbers (one decimal, in percent).
    line = [x for x in demo["stdout"].splitlines() if x.startswith("DUME whole model ")][1]
    shown = [float(v.rstrip("%")) for v in line.split()[3:]]
    want = [per[d] * 100 for d in zoo.domains] + [ret["DUME whole model"]["mean"] * 100]
    assert shown == pytest.approx(want, abs=0.051)
    # Whole-model routing accuracy: one router (depth "single") or one per layer.
    acc = demo["routing_accuracy_whole_model"]
    assert set(acc) == set(zoo.domains)
    assert all(len(v) == whole.config.num_routers for v in acc.values())


def test_demo_routing_accuracy_is_per_layer_and_above_chance(demo, test_zoo):
    acc = demo["routing_accuracy"]
    assert set(acc) == set(test_zoo.domains)
    num_layers = test_zoo.config["num_hidden_layers"]
    values = [v for d in acc for v in acc[d]]
    assert all(len(acc[d]) == num_layers for d in acc)
    assert all(0.0 <= v <= 1.0 for v in values)
    assert sum(values) / len(values) > 1.5 / len(test_zoo.domains)  # chance is 1/E


def test_demo_prints_the_table(demo, test_zoo):
    out = demo["stdout"]
    assert "validation perplexity" in out and "routing accuracy" in out
    assert "uniform averaging" in out and "DUME" in out
    dume_row = next(line for line in out.splitlines() if line.startswith("DUME "))
    shown = [float(v) for v in dume_row.split()[1:]]
    expected = [demo["perplexity"]["DUME"][d] for d in test_zoo.domains]
    assert shown[:-1] == pytest.approx(expected, abs=0.006)
    assert shown[-1] == pytest.approx(sum(expected) / len(expected), abs=0.006)
