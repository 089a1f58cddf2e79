"""DUME+ training pieces: router-only updates, the k=1 weightings, task arithmetic, retention."""

import math

import pytest
import torch
import transformers

import fastdume
from fastdume.data import batches, load_tokenizer
from fastdume.eval import retention, router_weighting, train_model
from fastdume.eval.baselines import random_routers, task_arithmetic
from fastdume.eval.finetune import _loss


@pytest.fixture(scope="module")
def dume(test_zoo):
    model = fastdume.upcycle([test_zoo.experts[d] for d in test_zoo.domains],
                             domains=test_zoo.domains)  # fmt: skip
    return random_routers(model, seed=1)  # fresh random routers: tokens spread over experts


def _batches_of(zoo):
    tok = load_tokenizer()
    return lambda d, split: batches(tok, d, split, zoo.config["seq_len"], 4, max_batches=2)


def _router_names(model):
    return {n for n, _ in model.named_parameters() if ".mlp.router." in n}


@pytest.mark.parametrize("weighting", ["switch", "st"])
def test_router_only_training_changes_only_routers(dume, test_zoo, weighting):
    model = fastdume.upcycle([test_zoo.experts[d] for d in test_zoo.domains],
                             domains=test_zoo.domains)  # fmt: skip
    model.load_state_dict(dume.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses, _ = train_model(model, _batches_of(test_zoo), test_zoo.domains, 3, 1e-2, "router",
                         weighting, progress=False)  # fmt: skip
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    routers = _router_names(model)
    assert len(routers) == 2 * test_zoo.config["num_hidden_layers"]
    for name, p in model.named_parameters():
        if name in routers:
            assert not torch.equal(p, before[name]), name
        else:  # includes every expert's gate rows of gate_up_proj
            assert torch.equal(p, before[name]), name
        assert p.requires_grad  # restored after training


def test_full_training_changes_expert_gates(dume, test_zoo):
    model = fastdume.upcycle([test_zoo.experts[d] for d in test_zoo.domains],
                             domains=test_zoo.domains)  # fmt: skip
    model.load_state_dict(dume.state_dict())
    gate = model.dume_layers()[0].experts.gate_up_proj
    before = gate.detach().clone()
    train_model(model, _batches_of(test_zoo), test_zoo.domains, 2, 1e-3, "all", "st",
                progress=False)  # fmt: skip
    assert not torch.equal(gate, before)


def _router_grad(model, batch, weighting):
    model.zero_grad(set_to_none=True)
    with router_weighting(model, weighting):
        loss = _loss(model, batch)
    loss.backward()
    return model.dume_layers()[0].router.weight.grad, loss


def test_k1_weightings_gradient_and_forward(dume, test_zoo):
    batch = next(_batches_of(test_zoo)(test_zoo.domains[0], "train"))
    grad, loss_topk = _router_grad(dume, batch, "topk")
    assert grad is None or float(grad.abs().max()) == 0.0  # softmax over one score: constant
    grad, loss_st = _router_grad(dume, batch, "st")
    assert grad is not None and float(grad.abs().max()) > 0
    grad, _ = _router_grad(dume, batch, "switch")
    assert grad is not None and float(grad.abs().max()) > 0
    with torch.no_grad():  # straight-through forward equals the model's own k=1 forward
        own = _loss(dume, batch)
    assert torch.allclose(loss_st.detach(), own, rtol=1e-5)
    assert torch.allclose(loss_topk.detach(), own, rtol=1e-5)
    dume.zero_grad(set_to_none=True)


def test_switch_weight_is_full_softmax_probability(dume):
    from fastdume.eval.finetune import _weights

    logits = torch.randn(7, 4, dtype=torch.float64)
    w, ids = _weights(logits, 1, "switch")
    ref = torch.exp(logits.max(-1).values) / torch.exp(logits).sum(-1)
    assert torch.allclose(w[:, 0], ref) and torch.equal(ids[:, 0], logits.argmax(-1))
    w2, _ = _weights(logits, 2, "topk")
    top = logits.topk(2).values
    assert torch.allclose(w2, torch.exp(top) / torch.exp(top).sum(-1, keepdim=True))


def test_task_arithmetic_matches_float64_reference(test_zoo):
    paths = [test_zoo.experts[d] for d in test_zoo.domains]
    model = task_arithmetic(test_zoo.base, paths, 0.3)
    load = transformers.AutoModelForCausalLM.from_pretrained
    base = load(test_zoo.base).state_dict()
    experts = [load(p).state_dict() for p in paths]
    for key in ("model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight"):
        ref = base[key].double() + 0.3 * sum(e[key].double() - base[key].double() for e in experts)
        assert torch.allclose(model.state_dict()[key].double(), ref, atol=1e-6)


def test_retention_numbers():
    r = retention({"a": 2.0, "b": 6.0}, {"a": 4.0, "b": 5.0})
    assert r["per_domain"] == {"a": 0.5, "b": 1.2}
    assert math.isclose(r["mean"], 0.85) and r["worst"] == 0.5


def test_bad_weighting_names_the_argument(dume):
    with pytest.raises(ValueError, match="weighting must be one of"):
        with router_weighting(dume, "gumbel"):
            pass
