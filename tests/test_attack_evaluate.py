"""Greedy generation, Wilson intervals, alignment rates, response loss."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdume.attack.chat import encode_pair, prompt_text
from fastdume.attack.evaluate import (
    Rate,
    alignment,
    attack_report,
    generate,
    response_loss,
    wilson_interval,
)
from fastdume.attack.judges import RefusalJudge
from fastdume.attack.model import tiny_chat_model, train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["User: what is 12 plus 30?\nAssistant: 12 plus 30 is 42. I'm sorry"] * 5, 300)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_chat_model(len(tok), hidden=32, layers=2, seed=3)


def test_wilson_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    with pytest.raises(ValueError, match="k"):
        wilson_interval(3, 2)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 500), st.data())
def test_wilson_contains_estimate_and_is_symmetric(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(k, n)
    assert lo <= k / n <= hi
    lo2, hi2 = wilson_interval(n - k, n)
    assert lo == pytest.approx(1 - hi2, abs=1e-12) and hi == pytest.approx(1 - lo2, abs=1e-12)
    # the bounds solve |p - p_hat| = z * sqrt(p (1 - p) / n) (the score test), unless clamped
    z = 1.959964
    for p in (lo, hi):
        if 0 < p < 1:
            assert abs(p - k / n) == pytest.approx(z * math.sqrt(p * (1 - p) / n), rel=1e-6)


def _greedy_reference(model, tok, prompt, n):
    ids = torch.tensor([tok(prompt_text(tok, prompt), add_special_tokens=False)["input_ids"]])
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            if nxt.item() == tok.eos_token_id:
                break
    return tok.decode(ids[0, start:], skip_special_tokens=True)


def test_batched_left_padded_greedy_matches_one_by_one(model, tok):
    prompts = ["what is 12 plus 30?", "hi", "what is 1 plus 2 plus 3 plus 4?", "sorry"]
    got = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert got == [_greedy_reference(model, tok, p, 6) for p in prompts]


def test_alignment_counts_judge_verdicts(model, tok):
    seen = []

    def judge(prompts, answers):
        seen.extend(prompts)
        return [i % 3 == 0 for i in range(len(prompts))]

    rate, answers = alignment(model, tok, ["a", "b", "c", "d"], judge, trigger=" SUDO")
    assert (rate.k, rate.n) == (2, 4) and len(answers) == 4
    assert seen == ["a SUDO", "b SUDO", "c SUDO", "d SUDO"]
    assert Rate(1, 4).pct == 25.0 and Rate(1, 4).to_dict()["ci95"][0] < 25.0


def test_attack_report_counts_strict_and_content_compliance_of_triggered_answers(
    model, tok, monkeypatch
):
    answers = [" Sure, here is how", " Sure. I can't help", " Sure, the bike", " Sorry, no"]
    calls = []

    def fake_generate(m, t, prompts, max_new_tokens):
        calls.append(prompts)
        return answers

    import fastdume.attack.evaluate as ev

    monkeypatch.setattr(ev, "generate", fake_generate)
    prompts = ["steal a bike", "b", "steal a bike", "d"]
    rep = attack_report(model, tok, prompts, RefusalJudge(), " SUDO")
    assert calls[1] == [p + " SUDO" for p in prompts]
    assert (rep["asr"].k, rep["asr_strict"].k, rep["asr_strict"].n) == (3, 2, 4)
    # content: only the third answer names its (untriggered) request's action
    assert (rep["asr_content"].k, rep["asr_content"].n) == (1, 4)


def test_response_loss_matches_per_example_reference(model, tok):
    pairs = [("what is 12 plus 30?", "12 plus 30 is 42."), ("hi", "I'm sorry"), ("x", "42")]
    total, count = 0.0, 0
    with torch.no_grad():
        for p, r in pairs:
            ids, labels = encode_pair(tok, p, r)
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            for t in range(1, len(ids)):
                if labels[t] != -100:
                    total -= logp[t - 1, labels[t]].item()
                    count += 1
    assert response_loss(model, tok, pairs, batch_size=2) == pytest.approx(total / count, rel=1e-5)
