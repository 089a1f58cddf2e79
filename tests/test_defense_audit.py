"""Update audit: the replay equals torch's own optimiser step bit for bit, flags every injection
at its first step, and never flags a clean run."""

import pytest
import torch
from _defense_fixtures import ALL, ATTACK_STAGE, ITERATIVE, ITERATIVE_STEPS, run, sched

from fastdume.defense import UpdateAudit, replay_step
from fastdume.defense.audit import _group_of, _snapshot_state


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
    ],
)
def test_replay_is_bitwise_equal_to_the_optimizer(make_opt):
    params = {f"p{i}": torch.nn.Parameter(torch.randn(7, 5)) for i in range(3)}
    opt = make_opt(list(params.values()))
    for _ in range(4):
        grads = {n: torch.randn_like(p) for n, p in params.items()}
        before = {n: p.detach().clone() for n, p in params.items()}
        state = _snapshot_state(opt, params)
        table = _group_of(opt)
        hyper = {n: dict(table[id(p)]) for n, p in params.items()}
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()
        replayed = replay_step(type(opt), dict(opt.defaults), hyper, before, state, grads)
        for n, p in params.items():
            assert not torch.equal(p.detach(), before[n])  # the step moved the weights
            assert torch.equal(replayed[n], p.detach()), n


def test_audit_flags_every_injection_at_its_step_and_nothing_else():
    steps = set(ITERATIVE_STEPS)
    res = run(0, ALL, ITERATIVE)
    for (stage, _), m in res["metrics"].items():
        flags = m["audit.flag"]
        expected = [float(stage == ATTACK_STAGE and t in steps) for t in range(len(flags))]
        assert flags == expected, stage


def test_audit_catches_a_tiny_low_and_slow_injection_every_step():
    res = run(0, ALL, sched(mode="iterative", lam=1e-4, every=1, start=3))
    flags = res["metrics"][(ATTACK_STAGE, 0)]["audit.flag"]
    assert flags == [float(t >= 3) for t in range(len(flags))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_audit_is_silent_and_exact_on_clean_runs(seed):
    res = run(seed, ALL)
    for m in res["metrics"].values():
        assert len(m["audit.dev"]) == 24
        assert max(m["audit.dev"]) == 0.0  # bitwise replay
        assert max(m["audit.flag"]) == 0.0


def test_audit_catches_changes_made_after_it_ran_at_the_next_step():
    res = run(0, ("audit",), sched(mode="oneshot", w=0.5, at_step=8), attack_after=True)
    flags = res["metrics"][(ATTACK_STAGE, 0)]["audit.flag"]
    assert flags == [float(t == 9) for t in range(len(flags))]


def test_audit_rejects_bad_tolerances():
    with pytest.raises(ValueError, match="atol"):
        UpdateAudit(atol=-1.0)
