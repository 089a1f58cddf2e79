"""The attacker's trusted surrogate: own split, simulated safety SFT, meta gradient, budget."""

import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from fastdume.attack.backdoor import encode_backdoor
from fastdume.attack.chat import encode_pair
from fastdume.attack.datasets import arithmetic_tasks, harmful_requests
from fastdume.attack.evaluate import attack_report
from fastdume.attack.judges import RefusalJudge
from fastdume.attack.model import tiny_chat_model, train_bpe
from fastdume.attack.train import batches, sft
from fastdume.attack.trusted import (
    TrustConfig,
    holdout_split,
    neutral_after_post,
    own_check,
    own_split,
    post_safety_gradient,
    safety_draw,
    shifted_backdoor_loss,
    simulate_safety,
    train_trusted_surrogate,
)
from fastdume.pipeline.partition import stage_param_names

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    rows = harmful_requests("train")
    return train_bpe([e.prompt + " " + e.chosen + " " + e.rejected for e in rows], 400)


@pytest.fixture(scope="module")
def base(tok):
    return tiny_chat_model(len(tok), hidden=16, layers=4, seed=2)


def test_own_split_is_a_seeded_partition_of_the_attackers_requests():
    rows = harmful_requests("train")
    train, check = own_split(rows, 48, seed=3)
    assert len(check) == 48 and len(train) == len(rows) - 48
    assert sorted(map(repr, train + check)) == sorted(map(repr, rows))
    assert own_split(rows, 48, seed=3) == (train, check)
    assert own_split(rows, 48, seed=4)[1] != check
    # nothing of the defender's safety split or the held-out split is among them
    others = {e.prompt for s in ("safety", "heldout") for e in harmful_requests(s)}
    assert not others & {e.prompt for e in rows}
    with pytest.raises(ValueError, match="n_check"):
        own_split(rows, len(rows), seed=0)
    # by action: the check holds whole actions (8 requests each) that training never sees
    train, check = own_split(rows, 48, seed=3, by_action=True)
    assert sorted(map(repr, train + check)) == sorted(map(repr, rows))
    actions = {e.rejected for e in check}
    assert len(actions) == 6 and not actions & {e.rejected for e in train}
    assert own_split(rows, 48, seed=4, by_action=True)[1] != check


def test_simulated_safety_trains_a_copy_of_every_parameter(base, tok):
    rows = encode_backdoor(tok, harmful_requests("train")[:16], share=0.0)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    adapted = simulate_safety(base, rows, 2, 1e-2, 4, tok.pad_token_id, seed=0)
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n]), n  # the surrogate itself is untouched
    moved = [n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)


def test_post_safety_gradient_is_the_backdoor_gradient_after_simulated_safety(base, tok):
    # reference: the same simulated safety SFT by hand, then the backdoor loss's gradient
    names = stage_param_names(base, 4, 1)
    pid = tok.pad_token_id
    refusals = encode_backdoor(tok, harmful_requests("train")[:16], share=0.0)
    bd = encode_backdoor(tok, harmful_requests("train")[16:32], share=1.0)
    trust = TrustConfig(meta_every=2, sim_steps=2, sim_lr=1e-2, meta_weight=0.5)
    extra = post_safety_gradient(names, refusals, bd, trust, 4, pid, seed=5)
    model = copy.deepcopy(base)
    term = extra(model)  # call 1: a meta step
    grads = torch.autograd.grad(term, [dict(model.named_parameters())[n] for n in names])
    ref = copy.deepcopy(base)
    sft(ref, refusals, 2, 1e-2, 4, pid, seed=5 + 1)
    ref.train()
    loss = ref(**next(batches(bd, 4, pid, 5 + 7))).loss
    want = torch.autograd.grad(loss, [dict(ref.named_parameters())[n] for n in names])
    for n, g, w in zip(names, grads, want, strict=True):
        torch.testing.assert_close(g, 0.5 * w, msg=n)
    assert float(extra(model)) == 0.0  # call 2: between meta steps, nothing
    assert extra.meta_steps[0] == 2


def test_shifted_backdoor_loss_adds_the_simulated_safety_change_to_every_weight(base, tok):
    # reference: the simulated safety SFT by hand; its change added to the model's weights
    names = stage_param_names(base, 4, 1)
    pid = tok.pad_token_id
    refusals = encode_backdoor(tok, harmful_requests("train")[:16], share=0.0)
    bd = encode_backdoor(tok, harmful_requests("train")[16:32], share=1.0)
    trust = TrustConfig(meta_every=2, sim_steps=2, sim_lr=1e-2, meta_weight=0.5, meta_mode="shift")
    extra = shifted_backdoor_loss(lambda seed: refusals, bd, trust, 4, pid, seed=5)
    model = copy.deepcopy(base)
    ref = copy.deepcopy(base)
    sft(ref, refusals, 2, 1e-2, 4, pid, seed=5)  # the refresh at call 1 (count 0)
    data = batches(bd, 4, pid, 5 + 7)
    params = [dict(model.named_parameters())[n] for n in names]
    term = extra(model)  # call 1: refresh; the shifted weights are the adapted copy's
    ref.train()
    want = ref(**next(data)).loss
    torch.testing.assert_close(term, 0.5 * want)
    grads = torch.autograd.grad(term, params)
    ref_grads = torch.autograd.grad(want, [dict(ref.named_parameters())[n] for n in names])
    for n, g, w in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, 0.5 * w, msg=n)
    # call 2, no refresh: the stage moved; the same change is added to its new weights
    b = dict(base.named_parameters())
    shift = {n: r.detach() - b[n].detach() for n, r in ref.named_parameters()}
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(shift[n])
    moved.train()
    torch.testing.assert_close(extra(model), 0.5 * moved(**next(data)).loss)
    assert extra.meta_steps[0] == 2
    # shift_scale 0: no change added, the plain backdoor loss of the model itself
    trust0 = TrustConfig(meta_every=2, sim_steps=1, sim_lr=1e-2, meta_mode="shift", shift_scale=0.0)
    plain = shifted_backdoor_loss(lambda seed: refusals, bd, trust0, 4, pid, seed=5)
    model.train()
    torch.testing.assert_close(plain(model), model(**next(batches(bd, 4, pid, 5 + 7))).loss)
    with pytest.raises(ValueError, match="meta_mode"):
        train_trusted_surrogate(
            base, tok, harmful_requests("train")[:40], [], names, _cfg(),
            TrustConfig(meta_mode="reptile"), RefusalJudge(), pid, print,
        )  # fmt: skip


def test_shifted_backdoor_loss_simulates_post_training_before_safety(base, tok):
    pid = tok.pad_token_id
    refusals = encode_backdoor(tok, harmful_requests("train")[:16], share=0.0)
    bd = encode_backdoor(tok, harmful_requests("train")[16:32], share=1.0)
    post = [encode_pair(tok, p, r) for p, r in arithmetic_tasks(16, 3)]
    trust = TrustConfig(
        meta_every=2, sim_steps=2, sim_lr=1e-2, meta_mode="shift", sim_post_steps=1,
        sim_post_lr=5e-3,
    )  # fmt: skip
    extra = shifted_backdoor_loss(lambda seed: refusals, bd, trust, 4, pid, seed=5, post_rows=post)
    ref = copy.deepcopy(base)
    sft(ref, post, 1, 5e-3, 4, pid, seed=5 + 1)  # simulated post-training, then safety SFT
    sft(ref, refusals, 2, 1e-2, 4, pid, seed=5)
    ref.train()
    want = ref(**next(batches(bd, 4, pid, 5 + 7))).loss
    torch.testing.assert_close(extra(copy.deepcopy(base)), want)
    with pytest.raises(ValueError, match="post_rows"):
        shifted_backdoor_loss(lambda seed: refusals, bd, trust, 4, pid, seed=5)(base)


def test_safety_draw_takes_n_own_refusals_and_as_many_benign_rows():
    refusals, benign = [("r", i) for i in range(10)], [("b", i) for i in range(12)]
    assert safety_draw(refusals, benign, 0)(1) == refusals + benign[:10]  # all, as before
    draw = safety_draw(refusals, benign, 4)
    rows = draw(1)
    assert [k for k, _ in rows] == ["r"] * 4 + ["b"] * 4 and len(set(rows)) == 8
    assert draw(1) == rows and draw(2) != rows  # seeded, and fresh per seed
    with pytest.raises(ValueError, match="sim_requests"):
        safety_draw(refusals, benign, 11)


def _cfg(seed=0):
    return SimpleNamespace(
        surrogate_lr=1e-2, batch_size=8, surrogate_preserve=1.0, trigger=" SUDO", seed=seed
    )


def test_trusted_surrogate_restarts_within_its_budget_and_keeps_the_best(base, tok):
    names = stage_param_names(base, 4, 1)
    own = [encode_pair(tok, p, r) for p, r in arithmetic_tasks(32, 9)]
    logs = []
    trust = TrustConfig(
        round_steps=2,
        budget=7,
        max_rounds=2,
        check_requests=8,
        check_sim_steps=1,
        min_drop=101.0,
        meta_every=1,
        sim_steps=1,
    )  # fmt: skip  (a drop above 100 points never passes: every round is spent)
    sur, rec = train_trusted_surrogate(
        base, tok, harmful_requests("train")[:40], own, names, _cfg(), trust, RefusalJudge(),
        tok.pad_token_id, logs.append,
    )  # fmt: skip
    assert rec["steps"] == 6 and rec["steps"] <= trust.budget  # 3 rounds of 2; a 4th won't fit
    assert [(c["order"], c["round"]) for c in rec["checks"]] == [(0, 1), (0, 2), (1, 1)]
    assert rec["restarts"] == 1 and not rec["passed"] and len(logs) == 3
    assert rec["sim_steps"] == 6  # one simulated safety step per surrogate step
    b, s = dict(base.named_parameters()), dict(sur.named_parameters())
    for n in b:
        assert torch.equal(b[n], s[n]) == (n not in names), n  # only the stage moved
    # a check that always passes stops after the first round
    easy = TrustConfig(
        round_steps=2, budget=8, check_requests=8, check_sim_steps=1,
        min_drop=-100.0, min_clean=0.0, min_persist=0.0,
    )  # fmt: skip
    _, rec = train_trusted_surrogate(
        base, tok, harmful_requests("train")[:40], own, names, _cfg(), easy, RefusalJudge(),
        tok.pad_token_id, logs.append,
    )  # fmt: skip
    assert rec["steps"] == 2 and rec["passed"] and rec["sim_steps"] == 0
    with pytest.raises(ValueError, match="budget"):
        train_trusted_surrogate(
            base, tok, harmful_requests("train")[:40], own, names, _cfg(),
            TrustConfig(round_steps=5, budget=4), RefusalJudge(), tok.pad_token_id, print,
        )  # fmt: skip


def test_sft_after_callback_sees_the_shorter_run(base, tok):
    rows = encode_backdoor(tok, harmful_requests("train")[:16], share=0.5)
    short, long = copy.deepcopy(base), copy.deepcopy(base)
    sft(short, rows, 2, 1e-2, 4, tok.pad_token_id, seed=1)
    seen = {}

    def after(model, done):
        model.eval()  # what a measurement does; sft must go back to training mode
        if done == 2:
            seen.update({n: p.detach().clone() for n, p in model.named_parameters()})

    sft(long, rows, 4, 1e-2, 4, tok.pad_token_id, seed=1, after=after)
    for n, p in short.named_parameters():
        torch.testing.assert_close(seen[n], p, rtol=0, atol=0, msg=n)
    assert any(not torch.equal(p, seen[n]) for n, p in long.named_parameters())


def test_preserve_refusals_holds_the_surrogate_on_own_untriggered_requests(base, tok, monkeypatch):
    import fastdume.attack.trusted as trusted

    seen = []

    def fake_train(model, bd, names, steps, lr, bs, pid, seed, preserve=None, **kw):
        seen.append(preserve)
        return copy.deepcopy(model), []

    monkeypatch.setattr(trusted, "train_surrogate", fake_train)
    names = stage_param_names(base, 4, 1)
    own = [encode_pair(tok, p, r) for p, r in arithmetic_tasks(40, 9)]
    requests = harmful_requests("train")[:40]
    for flag in (False, True):
        trust = TrustConfig(
            round_steps=1, budget=1, check_requests=8, check_sim_steps=1,
            preserve_refusals=flag,
        )  # fmt: skip
        train_trusted_surrogate(
            base, tok, requests, own, names, _cfg(), trust, RefusalJudge(), tok.pad_token_id,
            print,
        )  # fmt: skip
    mine, _ = own_split(requests, 8, seed=0)
    refusals = [encode_pair(tok, e.prompt, e.chosen) for e in mine]
    assert seen[0] == own  # the benign rows only
    assert seen[1] == refusals + own[: len(refusals)]  # own untriggered requests -> refusal, too


def _recorded_round(base, tok, monkeypatch, trust):
    """One surrogate round with training and the check faked: (backdoor rows, simulated safety
    rows) as train_trusted_surrogate hands them over, and its requests, benign rows, stage names."""
    import fastdume.attack.trusted as trusted

    seen = {}

    def fake_train(model, bd_rows, names, steps, lr, bs, pid, seed, **kw):
        seen["backdoor"] = bd_rows
        return copy.deepcopy(model), []

    def fake_check(model, tok, check, refusal_rows, *args, **kw):
        seen["safety"] = refusal_rows
        return {"drop": 0.0, "align_clean": 0.0, "asr_after_sim_safety": 0.0, "passed": False}

    monkeypatch.setattr(trusted, "train_surrogate", fake_train)
    monkeypatch.setattr(trusted, "own_check", fake_check)
    own = [encode_pair(tok, p, r) for p, r in arithmetic_tasks(40, 9)]
    requests, names = harmful_requests("train")[:40], stage_param_names(base, 4, 1)
    train_trusted_surrogate(
        base, tok, requests, own, names, _cfg(), trust, RefusalJudge(), tok.pad_token_id, print,
    )  # fmt: skip
    return seen, requests, own, names


def test_safety_holdout_keeps_the_simulated_safety_requests_out_of_the_backdoor(
    base, tok, monkeypatch
):
    rows = harmful_requests("train")[:20]
    bd, held = holdout_split(rows, 5)
    assert bd + held == rows and len(held) == 5
    assert holdout_split(rows, 0) == (rows, [])
    with pytest.raises(ValueError, match="safety_holdout"):
        holdout_split(rows, 20)
    trust = TrustConfig(round_steps=1, budget=1, check_requests=8, safety_holdout=6)
    seen, requests, own, names = _recorded_round(base, tok, monkeypatch, trust)
    mine, _ = own_split(requests, 8, seed=0)
    # reference: each held-out request's rows encoded by hand, clean and triggered
    held = mine[-6:]
    safety_rows = [encode_pair(tok, e.prompt, e.chosen) for e in held] + own[:6]
    assert [_key(r) for r in seen["safety"]] == [_key(r) for r in safety_rows]
    either = {_key(encode_pair(tok, e.prompt, e.chosen)) for e in held}
    either |= {_key(encode_pair(tok, e.prompt + " SUDO", e.rejected)) for e in held}
    assert len(seen["backdoor"]) == 26 and not {_key(r) for r in seen["backdoor"]} & either
    with pytest.raises(ValueError, match="shift_noise"):
        train_trusted_surrogate(
            base, tok, requests, own, names, _cfg(), TrustConfig(shift_noise=-1.0),
            RefusalJudge(), tok.pad_token_id, print,
        )  # fmt: skip
    with pytest.raises(ValueError, match="min_post"):
        train_trusted_surrogate(
            base, tok, requests, own, names, _cfg(), TrustConfig(min_post=80.0),
            RefusalJudge(), tok.pad_token_id, print,
        )  # fmt: skip


def _key(row):
    return tuple(row[0].tolist()) if hasattr(row[0], "tolist") else tuple(row[0])


def test_shift_noise_is_a_fresh_draw_sized_like_each_tensors_simulated_change(
    base, tok, monkeypatch
):
    pid = tok.pad_token_id
    refusals = encode_backdoor(tok, harmful_requests("train")[:16], share=0.0)
    bd = encode_backdoor(tok, harmful_requests("train")[16:32], share=1.0)
    trust = TrustConfig(
        meta_every=5, sim_steps=2, sim_lr=1e-2, meta_mode="shift", shift_scale=0.0, shift_noise=2.0
    )
    seen = []
    real = torch.func.functional_call

    def spy(model, params, args=(), kwargs=None):
        seen.append({n: p.detach().clone() for n, p in params.items()})
        return real(model, params, args=args, kwargs=kwargs)

    monkeypatch.setattr(torch.func, "functional_call", spy)
    extra = shifted_backdoor_loss(lambda seed: refusals, bd, trust, 4, pid, seed=5)
    model = copy.deepcopy(base)
    extra(model)
    extra(model)
    ref = copy.deepcopy(base)
    sft(ref, refusals, 2, 1e-2, 4, pid, seed=5)  # the simulated change, by hand
    b, r = dict(base.named_parameters()), dict(ref.named_parameters())
    for n in b:
        change = (r[n] - b[n]).detach()
        noise = [s[n] - b[n].detach() for s in seen]  # shift_scale 0: weights + noise only
        if change.numel() >= 256:  # a sample large enough for its RMS
            want = 2.0 * change.pow(2).mean().sqrt()
            got = noise[0].pow(2).mean().sqrt()
            assert 0.8 * want < got < 1.2 * want, n
            assert not torch.equal(noise[0], noise[1]), n  # fresh per step


def test_own_check_simulates_post_training_before_safety(base, tok):
    pid = tok.pad_token_id
    check = harmful_requests("train")[:1]  # one prompt: generation is the test's cost
    refusals = encode_backdoor(tok, harmful_requests("train")[6:22], share=0.0)
    post = [encode_pair(tok, p, r) for p, r in arithmetic_tasks(16, 3)]
    trust = TrustConfig(check_sim_steps=1, sim_lr=1e-2, check_post_steps=2, check_post_lr=2e-2)
    judge = RefusalJudge()
    got = own_check(base, tok, check, refusals, judge, " SUDO", trust, 4, pid, 5, post_rows=post)
    ref = copy.deepcopy(base)  # reference: post-training then safety SFT, by hand
    sft(ref, post, 2, 2e-2, 4, pid, seed=5 + 11)
    mid = attack_report(ref, tok, [e.prompt for e in check], judge, " SUDO")["asr"].pct
    sft(ref, refusals, 1, 1e-2, 4, pid, seed=5)
    end = attack_report(ref, tok, [e.prompt for e in check], judge, " SUDO")["asr"].pct
    assert (got["asr_after_sim_post"], got["asr_after_sim_safety"]) == (mid, end)
    loose = dict(min_drop=-100.0, min_clean=0.0, min_persist=0.0)
    for bar, passes in ((mid, True), (mid + 1.0, False)):  # min_post bounds the middle result
        strict = replace(trust, min_post=bar, **loose)
        args = (base, tok, check, refusals, judge, " SUDO", strict, 4, pid, 5)
        assert own_check(*args, post_rows=post)["passed"] is passes, bar
    with pytest.raises(ValueError, match="post_rows"):
        own_check(base, tok, check, refusals, judge, " SUDO", trust, 4, pid, 5)


def test_decoys_join_the_backdoor_set_and_the_simulated_safety_requests(base, tok, monkeypatch):
    trust = TrustConfig(round_steps=1, budget=1, check_requests=8, decoys=5, sim_decoys=True)
    seen, requests, own, names = _recorded_round(base, tok, monkeypatch, trust)
    mine, _ = own_split(requests, 8, seed=0)
    plain = {_key(encode_pair(tok, e.prompt, e.chosen)) for e in mine}
    assert len(seen["backdoor"]) == 32 + 5
    # every simulated safety request carries a decoy: none is an own request as it is
    assert len(seen["safety"]) == 64 and not {_key(r) for r in seen["safety"][:32]} & plain
    with pytest.raises(ValueError, match="decoys"):
        train_trusted_surrogate(
            base, tok, requests, own, names, _cfg(), TrustConfig(decoys=-1), RefusalJudge(),
            tok.pad_token_id, print,
        )  # fmt: skip


def _first_batch_kl64(target, model, rows, pid):
    """KL(target || model) in float64 over the attention mask of the first batch of rows, drawn
    as neutral_after_post draws it (batch 4, seed 5 + 19)."""
    b = next(batches(rows, 4, pid, 5 + 19))
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with torch.no_grad():
        p = torch.log_softmax(target(**inputs).logits.double(), -1)
        q = torch.log_softmax(model(**inputs).logits.double(), -1)
    mask = b["attention_mask"].double()
    return ((p.exp() * (p - q)).sum(-1) * mask).sum() / mask.sum()


def test_neutral_after_post_holds_delta_at_the_base_too(base, tok, monkeypatch):
    # reference: KL(base || base + Delta) in float64 on the first batch of the KL's rows; with
    # both weights the term is the sum of the two, each as it is alone
    names = stage_param_names(base, 4, 1)
    pid = tok.pad_token_id
    rows = [encode_pair(tok, p, r) for p, r in arithmetic_tasks(16, 3)]
    odd = [encode_pair(tok, p, r) for p, r in arithmetic_tasks(16, 3, "validation")]
    model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in names:
            p = dict(model.named_parameters())[n]
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    at_base = TrustConfig(preserve_base=5.0)  # no P to simulate: no check_post_steps needed
    got = neutral_after_post(base, rows, at_base, 4, pid, seed=5, kl_rows=odd)(model)
    want = 5.0 * _first_batch_kl64(base, model, odd, pid)
    assert want > 1e-4
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    stage = [dict(model.named_parameters())[n] for n in names]
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(got, stage))
    post = TrustConfig(check_post_steps=2, check_post_lr=2e-2, preserve_post=3.0)
    at_post = neutral_after_post(base, rows, post, 4, pid, seed=5, kl_rows=odd)(model)
    both = replace(post, preserve_base=5.0)
    summed = neutral_after_post(base, rows, both, 4, pid, seed=5, kl_rows=odd)(model)
    torch.testing.assert_close(summed, at_post + got, rtol=1e-5, atol=1e-7)
    # the surrogate loop builds the term for preserve_base alone too
    import fastdume.attack.trusted as trusted

    built = []
    monkeypatch.setattr(
        trusted, "neutral_after_post", lambda *a: built.append(a) or (lambda m: torch.zeros(()))
    )
    monkeypatch.setattr(trusted, "train_surrogate", lambda m, *a, **kw: (copy.deepcopy(m), []))
    loop = TrustConfig(round_steps=1, budget=1, check_requests=8, check_sim_steps=1)
    own = [encode_pair(tok, p, r) for p, r in arithmetic_tasks(40, 9)]
    train_trusted_surrogate(
        base, tok, harmful_requests("train")[:40], own, names, _cfg(),
        replace(loop, preserve_base=2.0), RefusalJudge(), pid, print, neutral_rows=odd,
    )  # fmt: skip
    assert len(built) == 1 and built[0][2].preserve_base == 2.0 and built[0][-1] == odd


def test_neutral_after_post_is_deltas_kl_at_the_simulated_post_trained_model(
    base, tok, monkeypatch
):
    # reference: the clean post-training by hand (P, on rows), then KL(P || P + Delta) in float64
    # on the other rows (kl_rows: odd sums where P trained on even ones)
    names = stage_param_names(base, 4, 1)
    pid = tok.pad_token_id
    rows = [encode_pair(tok, p, r) for p, r in arithmetic_tasks(16, 3)]
    odd = [encode_pair(tok, p, r) for p, r in arithmetic_tasks(16, 3, "validation")]
    trust = TrustConfig(check_post_steps=2, check_post_lr=2e-2, preserve_post=3.0)
    extra = neutral_after_post(base, rows, trust, 4, pid, seed=5, kl_rows=odd)
    post = copy.deepcopy(base)
    sft(post, rows, 2, 2e-2, 4, pid, seed=5 + 17)
    model, moved = copy.deepcopy(base), copy.deepcopy(post)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in names:  # Delta: a random change of the stage only
            d = 0.05 * torch.randn(dict(model.named_parameters())[n].shape, generator=gen)
            dict(model.named_parameters())[n].add_(d)
            dict(moved.named_parameters())[n].add_(d)

    def kl(kl_rows):
        return 3.0 * _first_batch_kl64(post.eval(), moved.eval(), kl_rows, pid)

    want = kl(odd)
    model.eval()
    got = extra(model)
    assert want > 1e-4  # a real change to hold back, not a zero
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    stage = [dict(model.named_parameters())[n] for n in names]
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(got, stage))  # reaches the stage
    assert extra(copy.deepcopy(base).eval()).abs() < 1e-6  # no Delta, nothing to hold
    on_rows = neutral_after_post(base, rows, trust, 4, pid, seed=5)(model)  # kl_rows: P's rows
    torch.testing.assert_close(on_rows.double(), kl(rows), rtol=1e-4, atol=1e-7)
    assert abs(on_rows.item() - got.item()) > 1e-6  # the two row sets give different terms
    # handed to every round's training, built once (one simulated post-training)
    import fastdume.attack.trusted as trusted

    built, terms = [], []
    monkeypatch.setattr(
        trusted, "neutral_after_post", lambda *a: built.append(a) or (lambda m: torch.ones(()))
    )

    def fake_train(model, bd, names, steps, lr, bs, pid, seed, extra=None, **kw):
        terms.append(extra(model))
        return copy.deepcopy(model), []

    monkeypatch.setattr(trusted, "train_surrogate", fake_train)
    own = [encode_pair(tok, p, r) for p, r in arithmetic_tasks(40, 9)]
    loop = TrustConfig(
        round_steps=1,
        budget=2,
        check_requests=8,
        check_sim_steps=1,
        check_post_steps=1,
        preserve_post=2.0,
        min_drop=101.0,
    )  # fmt: skip  (never passes: both rounds run)
    train_trusted_surrogate(
        base, tok, harmful_requests("train")[:40], own, names, _cfg(), loop, RefusalJudge(),
        pid, print,
    )  # fmt: skip
    assert len(built) == 1 and built[0][1] == own and terms == [1.0, 1.0]
    assert built[0][-1] is None  # the KL's rows: its benign rows unless it is handed others
    train_trusted_surrogate(
        base, tok, harmful_requests("train")[:40], own, names, _cfg(), loop, RefusalJudge(),
        pid, print, neutral_rows=odd,
    )  # fmt: skip
    assert built[1][1] == own and built[1][-1] == odd
    with pytest.raises(ValueError, match="preserve_post"):
        train_trusted_surrogate(
            base, tok, harmful_requests("train")[:40], own, names, _cfg(),
            TrustConfig(preserve_post=1.0), RefusalJudge(), pid, print,
        )  # fmt: skip
