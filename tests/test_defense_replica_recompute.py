"""Replica divergence and redundant recomputation: fire on an injection, silent on clean runs,
and recomputation is honestly blind to a weight-only attacker unless weights are pinned."""

import pytest
import torch
from _defense_fixtures import ALL, ATTACK_STAGE, CFG, ITERATIVE, ITERATIVE_STEPS, run, sched

from fastdume.defense import replica_divergence, sim, verify_recompute
from fastdume.defense.recompute import llama_stage_forward
from fastdume.pipeline.partition import split_layers

REPLICA = ("audit", "replica")


def test_replica_divergence_flags_the_drifting_replica_at_the_injection_step():
    m = run(0, REPLICA, sched(mode="oneshot", w=0.3, at_step=7), replicas=2)["metrics"]
    got = replica_divergence(m, ATTACK_STAGE)
    assert got["first_step"] == 7 and got["replicas"] == [0, 1]  # two replicas: both suspects
    assert got["max_drift"] > 0
    for s in range(CFG.stages):
        if s != ATTACK_STAGE:
            assert replica_divergence(m, s)["first_step"] is None


def test_replicas_stay_bitwise_equal_on_a_clean_run():
    m = run(1, REPLICA, None, replicas=2)["metrics"]
    for s in range(CFG.stages):
        assert replica_divergence(m, s) == {
            "first_step": None,
            "replicas": [],
            "max_drift": 0.0,
            "blind": False,
        }
        assert max(m[(s, 0)]["audit.flag"]) == 0.0


def test_replica_divergence_is_blind_with_one_replica():
    m = run(0, ALL, ITERATIVE)["metrics"]
    assert replica_divergence(m, ATTACK_STAGE)["blind"] is True


def test_llama_stage_forward_matches_the_full_model():
    model = sim.base_model(CFG)
    a, b = split_layers(CFG.layers, CFG.stages)[ATTACK_STAGE]
    ids = torch.randint(CFG.vocab, (3, CFG.seq_len))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    weights = {n: p for n, p in model.named_parameters() if n.startswith(f"model.layers.{a}.")}
    fwd = llama_stage_forward(model.config, (a, b))
    torch.testing.assert_close(fwd(weights, hs[a]), hs[b], rtol=1e-5, atol=1e-5)


def _verify(res, stage, prefix, tol=1e-4):
    mc = sim._model_config(CFG)
    fwd = llama_stage_forward(mc, split_layers(CFG.layers, CFG.stages)[stage])
    return verify_recompute(res["messages"], stage, fwd, tol=tol, prefix=prefix)


@pytest.mark.parametrize("prefix", ["recompute", "recompute_pinned"])
def test_recomputation_is_exact_on_a_clean_run(prefix):
    for stage in (1, 2):
        got = _verify(run(0, ALL), stage, prefix)
        assert got["checked"] >= 5 and got["first_step"] is None and got["max_rel_err"] < 1e-6


def test_recomputation_with_declared_weights_is_blind_to_weight_injection():
    got = _verify(run(0, ALL, ITERATIVE), ATTACK_STAGE, "recompute")
    assert got["checked"] >= 5 and got["first_step"] is None


def test_recomputation_with_pinned_weights_catches_weight_injection():
    res = run(0, ALL, ITERATIVE)
    got = _verify(res, ATTACK_STAGE, "recompute_pinned")
    sampled_after = sorted(
        {st for st, tag, _ in res["messages"][(ATTACK_STAGE, 0)] if tag.startswith("recompute_p")}
    )
    # The first sampled forward that runs on injected weights is caught.
    assert got["first_step"] == min(t for t in sampled_after if t > ITERATIVE_STEPS[0])
    assert _verify(res, 1, "recompute_pinned")["first_step"] is None  # stage 1 is honest


def test_recomputation_catches_tampered_activations():
    res = run(0, ALL)
    msgs = {k: list(v) for k, v in res["messages"].items()}
    out = msgs[(ATTACK_STAGE, 0)]
    i = next(i for i, (_, tag, _) in enumerate(out) if tag.startswith("recompute.act."))
    step, tag, t = out[i]
    out[i] = (step, tag, t + 1e-2 * torch.randn_like(t))
    got = _verify({"messages": msgs}, ATTACK_STAGE, "recompute")
    assert got["first_step"] == step
