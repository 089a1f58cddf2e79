"""Stages, surrogate and Delta, injection schedules and hooks, the threat model."""

import copy

import numpy as np
import pytest
import torch

from fastdume.attack.chat import collate
from fastdume.attack.inject import BackdoorInjection, Schedule, make_hooks
from fastdume.attack.model import tiny_chat_model
from fastdume.attack.simulate import simulate_training
from fastdume.attack.surrogate import (
    backdoor_delta,
    delta_share,
    load_delta,
    save_delta,
    train_surrogate,
)
from fastdume.pipeline.hooks import StageContext
from fastdume.pipeline.partition import stage_layers, stage_param_names

VOCAB = 97


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=24, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (length,), generator=g).tolist()
        out.append((ids, [-100] * 4 + ids[4:]))  # equal lengths: shard means = batch mean
    return out


@pytest.fixture(scope="module")
def base():
    return tiny_chat_model(VOCAB, hidden=32, layers=4, seed=1)


@pytest.mark.parametrize("layers,stages", [(4, 4), (8, 4), (10, 4), (7, 3), (5, 1)])
def test_stage_layers_partition(layers, stages):
    ranges = [stage_layers(layers, stages, s) for s in range(stages)]
    assert [i for r in ranges for i in r] == list(range(layers))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_stage_param_names_partition(base):
    names = [stage_param_names(base, 4, s) for s in range(4)]
    flat = [n for ns in names for n in ns]
    assert sorted(flat) == sorted(n for n, _ in base.named_parameters())
    assert len(set(flat)) == len(flat)
    assert "model.embed_tokens.weight" in names[0] and "model.norm.weight" in names[3]
    assert all(n.startswith("model.layers.1.") for n in names[1])


def test_surrogate_changes_only_the_stage_and_delta_is_zero_elsewhere(base, tmp_path):
    names = stage_param_names(base, 4, 1)
    surrogate, losses = train_surrogate(base, _data(), names, 5, 1e-2, 8, pad_id=0)
    assert losses[-1] < losses[0]
    b, s = dict(base.named_parameters()), dict(surrogate.named_parameters())
    for n in b:
        if n in names:
            assert not torch.equal(b[n], s[n])
        else:
            assert torch.equal(b[n], s[n]), n
    delta = backdoor_delta(base, surrogate, names)
    assert sorted(delta) == sorted(names)
    full = {n: s[n] - b[n] for n in b}
    assert all(full[n].abs().max() == 0 for n in b if n not in names)
    for n in names:
        torch.testing.assert_close(delta[n], full[n], rtol=0, atol=0)
    save_delta(delta, tmp_path / "delta.safetensors")
    loaded = load_delta(tmp_path / "delta.safetensors")
    assert all(torch.equal(loaded[n], delta[n]) for n in names)
    assert [p.name for p in tmp_path.iterdir()] == ["delta.safetensors"]


def test_delta_share_against_float64_numpy():
    g = torch.Generator().manual_seed(7)
    delta = {n: torch.randn(5, 3, generator=g) for n in ("a", "b")}
    ref = {n: torch.randn(5, 3, generator=g) for n in ("a", "b", "untouched")}
    noise = {n: torch.randn(5, 3, generator=g) for n in delta}
    w = {n: ref[n] + 0.7 * delta[n] + noise[n] for n in delta}
    kept, rest = delta_share(w, ref, delta)
    d = np.concatenate([delta[n].double().numpy().ravel() for n in delta])
    x = np.concatenate([(w[n].double() - ref[n].double()).numpy().ravel() for n in delta])
    want = x @ d / (d @ d)
    assert kept == pytest.approx(want, rel=1e-12) and abs(want - 0.7) < 0.5  # noise moves it
    assert rest == pytest.approx(np.linalg.norm(x - want * d) / np.linalg.norm(d), rel=1e-12)
    exact = {n: ref[n] + 0.25 * delta[n] for n in delta}
    assert delta_share(exact, ref, delta) == pytest.approx((0.25, 0.0), abs=1e-6)
    with pytest.raises(ValueError, match="Delta is zero"):
        delta_share(w, ref, {n: torch.zeros(5, 3) for n in delta})


def test_schedules():
    assert Schedule("oneshot", 0.5, at=3).coefficients(6) == [0, 0, 0, 0.5, 0, 0]
    it = Schedule("iterative", 0.1, every=3, start=2, stop=10).coefficients(12)
    assert [i for i, c in enumerate(it) if c] == [2, 5, 8] and set(it) == {0.0, 0.1}
    ramp = Schedule("iterative", 0.3, every=1, ramp=3).coefficients(5)
    assert ramp == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    capped = Schedule("iterative", 0.4, every=2, budget=1.0)
    coefs = capped.coefficients(10)
    assert sum(coefs) == pytest.approx(1.0) and coefs[:5] == pytest.approx([0.4, 0, 0.4, 0, 0.2])
    assert [capped.coefficient(i) for i in range(10)] == coefs
    with pytest.raises(ValueError, match="mode"):
        Schedule("sometimes")


def _ctx(model, stage=1, replica=0):
    params = dict(model.named_parameters())
    names = stage_param_names(model, 4, stage)
    r = stage_layers(4, 4, stage)
    return StageContext(stage, 4, replica, 1, (r.start, r.stop), {n: params[n] for n in names})


def test_hook_adds_scaled_delta_to_the_stage_only(base):
    model = copy.deepcopy(base)
    names = stage_param_names(model, 4, 1)
    delta = {n: torch.randn_like(p) for n, p in model.named_parameters() if n in names}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hook = BackdoorInjection(delta, Schedule("iterative", 0.25, every=2))
    for step in range(4):
        hook.after_step(_ctx(model), step)
    for n, p in model.named_parameters():
        expected = before[n] + 0.5 * delta[n] if n in names else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)
    assert hook.injected == 0.5
    outside = BackdoorInjection(
        {"model.layers.2.mlp.up_proj.weight": torch.ones(1)}, Schedule("oneshot", 1.0)
    )
    with pytest.raises(ValueError, match="outside stage 1"):
        outside.after_step(_ctx(model), 0)


def test_factory_only_arms_the_attacker(tmp_path):
    save_delta({"w": torch.randn(3)}, tmp_path / "d.safetensors")
    kw = {"delta": str(tmp_path / "d.safetensors"), "attacker_stage": 2, "mode": "oneshot"}
    armed = [(s, r) for s in range(4) for r in range(2) if make_hooks(s, r, 4, 2, **kw)]
    assert armed == [(2, 0)]
    assert make_hooks(2, 1, 4, 2, attacker_replica=1, **kw)[0].schedule.mode == "oneshot"
    with pytest.raises(ValueError, match="attacker_replica"):
        make_hooks(2, 0, 4, 2, attacker_replica=2, **kw)
    with pytest.raises(ValueError, match="attacker_stage"):
        make_hooks(0, 0, 4, 1, delta={}, attacker_stage=0)


def test_simulated_replicas_equal_single_process_training(base):
    # float64: Adam divides by sqrt(v), which magnifies fp32 summation-order noise
    base = copy.deepcopy(base).double()
    data = _data(16)
    one, l1 = simulate_training(copy.deepcopy(base), data, 3, 1e-2, 8, 0, num_replicas=1)
    two, l2 = simulate_training(copy.deepcopy(base), data, 3, 1e-2, 8, 0, num_replicas=2)
    assert l1 == pytest.approx(l2, rel=1e-6)  # the HF loss is computed in fp32
    for (n, a), (_, b) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)
    # reference: a hand-written AdamW loop over the same batches
    ref = copy.deepcopy(base)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95))
    from fastdume.attack.train import batches

    it = batches(data, 8, 0, seed=0)
    for _ in range(3):
        opt.zero_grad()
        ref(**next(it)).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
    for (n, a), (_, b) in zip(one.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("replicas", [1, 2])
def test_threat_model_only_the_stage_differs_from_an_honest_run(base, replicas):
    data, steps = _data(16), 4
    names = set(stage_param_names(base, 4, 1))
    delta = {n: torch.randn_like(p) for n, p in base.named_parameters() if n in names}
    honest, _ = simulate_training(copy.deepcopy(base), data, steps, 1e-2, 8, 0, 4, replicas)
    attacked, _ = simulate_training(
        copy.deepcopy(base),
        data,
        steps,
        1e-2,
        8,
        0,
        4,
        replicas,
        hooks="fastdume.attack.inject:make_hooks",
        hook_kwargs={"delta": delta, "mode": "oneshot", "scale": 0.5, "at": steps - 1},
    )
    for (n, h), (_, a) in zip(honest.named_parameters(), attacked.named_parameters(), strict=True):
        if n in names:
            torch.testing.assert_close(a, h + 0.5 * delta[n], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, h), n


def test_injection_reaches_training_through_honest_gradients_only(base):
    # an early injection changes other stages only via the gradients of the next steps
    data = _data(16)
    names = set(stage_param_names(base, 4, 1))
    delta = {n: torch.randn_like(p) * 0.1 for n, p in base.named_parameters() if n in names}
    kw = {"delta": delta, "mode": "oneshot", "scale": 1.0, "at": 0}
    one, _ = simulate_training(
        copy.deepcopy(base),
        data,
        1,
        1e-2,
        8,
        0,
        hooks="fastdume.attack.inject:make_hooks",
        hook_kwargs=kw,
    )
    honest, _ = simulate_training(copy.deepcopy(base), data, 1, 1e-2, 8, 0)
    outside = [n for n, _ in base.named_parameters() if n not in names]
    h, o = dict(honest.named_parameters()), dict(one.named_parameters())
    assert all(torch.equal(h[n], o[n]) for n in outside)
    batch = collate(data[:8], 0)
    assert one(**batch).loss.item() != honest(**batch).loss.item()


def test_preserve_holds_the_surrogate_to_the_base_on_benign_rows(base):
    names = stage_param_names(base, 2, 1)
    # a backdoor set that pulls every answer to token 5, and unrelated rows to keep
    bd = [(ids[:4] + [5] * 6, [-100] * 4 + [5] * 6) for ids, _ in _data(16, seed=1)]
    keep = _data(16, seed=2)
    free, _ = train_surrogate(base, bd, names, 40, 1e-2, 8, pad_id=0)
    held, _ = train_surrogate(
        base, bd, names, 40, 1e-2, 8, pad_id=0, preserve=keep, preserve_weight=10.0
    )
    batch = collate(keep, 0)

    def kl_to_base(model):
        with torch.no_grad():
            ref = torch.log_softmax(base(input_ids=batch["input_ids"]).logits.double(), -1)
            got = torch.log_softmax(model(input_ids=batch["input_ids"]).logits.double(), -1)
        return (ref.exp() * (ref - got)).sum(-1).mean().item()

    assert kl_to_base(held) < 0.3 * kl_to_base(free)
    b, h = dict(base.named_parameters()), dict(held.named_parameters())
    assert all(torch.equal(b[n], h[n]) for n in b if n not in names)
