"""Mixed-domain rows (domain a's text, then b's): rows, per-half perplexity, routing, retention."""

import math

import pytest
import torch
import transformers

import fastdume
from fastdume.data import batches, load_tokenizer
from fastdume.eval.mixed import evaluate_mixed, mixed_batch, mixed_retention

ROWS = 3


def _batches_of(zoo):
    tok = load_tokenizer()

    def batches_of(domain, split):
        cap = None if split == "train" else 2
        return batches(tok, domain, split, zoo.config["seq_len"], 8, cap, seed=5)

    return batches_of


def _dense(zoo, domain):
    return transformers.AutoModelForCausalLM.from_pretrained(zoo.experts[domain]).eval()


def _nll64(model, ids, mask, lo, hi):
    """Float64 reference: summed NLL and count of the real targets at positions [lo, hi), one row
    at a time."""
    total, count = 0.0, 0
    for i in range(ids.shape[0]):
        with torch.no_grad():
            logits = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        for t in range(max(lo, 1), hi):
            if mask[i, t] and mask[i, t - 1]:
                total -= float(logp[t - 1, ids[i, t]])
                count += 1
    return total, count


def test_rows_are_a_then_b(test_zoo):
    zoo = test_zoo
    batches_of = _batches_of(zoo)
    a, b = zoo.domains[0], zoo.domains[2]
    batch, half = mixed_batch(batches_of, a, b, ROWS)
    assert half == zoo.config["seq_len"] // 2
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (ROWS, 2 * half)
    heads = [r for bt in batches_of(a, "test") for r in bt["input_ids"][:, :half]]
    tails = [r for bt in batches_of(b, "test") for r in bt["input_ids"][:, :half]]
    for i in range(ROWS):  # the first rows of each domain (full windows) in their order
        assert any(torch.equal(ids[i, :half], h) for h in heads)
        assert any(torch.equal(ids[i, half:], t) for t in tails)
    assert mask[:, :half].all()  # a first half never ends in padding


def test_half_perplexities_match_a_float64_reference(test_zoo):
    zoo = test_zoo
    batches_of = _batches_of(zoo)
    domains = zoo.domains[:3]
    model = _dense(zoo, domains[1])
    res = evaluate_mixed(model, batches_of, domains, rows=ROWS)
    assert set(res["pairs"]) == {f"{a}>{b}" for a in domains for b in domains if a != b}
    assert res["curve"] is None
    for pair in (f"{domains[0]}>{domains[2]}", f"{domains[2]}>{domains[1]}"):
        a, b = pair.split(">")
        batch, half = mixed_batch(batches_of, a, b, ROWS)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for name, lo, hi in (("first", 0, half), ("second", half, 2 * half)):
            total, count = _nll64(model, ids, mask, lo, hi)
            want = math.exp(total / count)
            assert math.isclose(res["pairs"][pair]["ppl"][name], want, rel_tol=1e-4), (pair, name)


@pytest.mark.parametrize("routed", ["mlp", "model"])
def test_forced_routing_gives_exact_half_accuracies(test_zoo, routed):
    zoo = test_zoo
    batches_of = _batches_of(zoo)
    domains = zoo.domains[:2]
    model = fastdume.upcycle([zoo.experts[d] for d in domains], domains=domains, routed=routed)
    a, b = domains
    with fastdume.moe.forced_expert(model, 0):  # every decision goes to a's expert
        res = evaluate_mixed(model, batches_of, domains, rows=ROWS, routing=True)
    assert res["pairs"][f"{a}>{b}"]["routing"] == {"first": 1.0, "second": 0.0}
    assert res["pairs"][f"{b}>{a}"]["routing"] == {"first": 0.0, "second": 1.0}
    half = zoo.config["seq_len"] // 2
    # Mean over both pairs: a's expert is right on the first half of a>b and the second of b>a.
    assert res["curve"][:half] == pytest.approx([0.5] * half)
    if routed == "model":  # forcing expert a reproduces dense a on every token of the row
        dense = evaluate_mixed(_dense(zoo, a), batches_of, domains, rows=ROWS)
        for pair, entry in res["pairs"].items():
            for h in ("first", "second"):
                want = dense["pairs"][pair]["ppl"][h]
                assert math.isclose(entry["ppl"][h], want, rel_tol=1e-4), (pair, h)


def test_retention_scores_each_half_against_its_domains_expert(test_zoo):
    zoo = test_zoo
    batches_of = _batches_of(zoo)
    domains = zoo.domains[:3]
    ref = {d: evaluate_mixed(_dense(zoo, d), batches_of, domains, rows=ROWS) for d in domains}
    a = domains[0]
    out = mixed_retention(ref, ref[a])  # dense a is its own reference where a is the domain
    for pair, ret in out["per_pair"].items():
        first, second = pair.split(">")
        assert (ret["first"] == 1.0) == (first == a)
        assert (ret["second"] == 1.0) == (second == a)
        want = ref[second]["pairs"][pair]["ppl"]["second"] / ref[a]["pairs"][pair]["ppl"]["second"]
        assert math.isclose(ret["second"], want, rel_tol=1e-12)
    firsts = [r["first"] for r in out["per_pair"].values()]
    assert math.isclose(out["first"]["retention"], sum(firsts) / len(firsts), rel_tol=1e-12)
    assert out["first"]["routing"] is None


def test_too_short_rows_are_refused(test_zoo):
    def batches_of(domain, split):
        yield {"input_ids": torch.ones(2, 3, dtype=torch.long),
               "attention_mask": torch.ones(2, 3, dtype=torch.long)}  # fmt: skip

    with pytest.raises(ValueError, match="sequence length >= 4, got 3"):
        mixed_batch(batches_of, "code", "legal", 2)
