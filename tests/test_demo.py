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
    assert set(rows) == {*(f"dense expert: {d}" for d in zoo.domains), "uniform averaging", "DUME"}
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
