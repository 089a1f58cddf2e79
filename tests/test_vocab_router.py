"""The vocabulary router (features "vocab" / "vocab:<h>"): statistics are the domains' token
counts (no forward), the fit is naive Bayes on them (against a float64 reference built from a
Counter), decisions are each domain's (decayed) mean log-likelihood of the tokens so far,
add/remove equal from-scratch builds, statistics files round-trip and refuse other options."""

import math
from collections import Counter

import pytest
import torch
from dume_fixtures import DOMAINS, domain_batches, make_experts

import fastdume
from fastdume.router import RouterStats, collect_stats, fit_router

VOCAB = 256  # tiny_models' vocabulary


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return make_experts(tmp_path_factory.mktemp("vocab"), shared_noise=0.05)[1]


def _upcycle(experts, domains, routed="model", features="vocab"):
    return fastdume.upcycle(
        [experts[d] for d in domains], domains=list(domains), routed=routed, features=features,
        depth="single", progress=False,
    )  # fmt: skip


def _build(experts, domains, routed="model", features="vocab", lam=1e-2):
    model = _upcycle(experts, domains, routed, features)
    stats = None
    for d in domains:
        stats = collect_stats(model, d, domain_batches(d), stats=stats, progress=False)
    return fit_router(model, stats, lam=lam), stats


def _counts(domain, max_tokens=None):
    counter, seen = Counter(), 0
    for batch in domain_batches(domain):
        for row, keep in zip(
            batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True
        ):
            for token, k in zip(row, keep, strict=True):
                if k and (max_tokens is None or seen < max_tokens):
                    counter[token] += 1
                    seen += 1
    return counter, seen


def test_statistics_are_token_counts_taken_without_a_forward(experts):
    model = _upcycle(experts, DOMAINS)
    model.forward = None  # a forward would fail: the counts need none
    for budget in (None, 17):
        stats = collect_stats(model, "b", domain_batches("b"), max_tokens=budget, progress=False)
        counter, seen = _counts("b", budget)
        want = torch.tensor([counter[v] for v in range(VOCAB)], dtype=torch.float64)
        assert (stats.num_layers, stats.hidden_size, stats.has_gram) == (1, VOCAB, False)
        assert torch.equal(stats.colsum("b")[0], want)
        assert stats.count("b").tolist() == [seen]
    with pytest.raises(ValueError, match="token counts"):
        stats.gram("b")


@pytest.mark.parametrize("routed,features", [("model", "vocab"), ("mlp", "vocab:3")])
def test_decisions_are_naive_bayes_on_the_counts(experts, routed, features):
    lam = 0.5
    model, _ = _build(experts, DOMAINS, routed, features, lam=lam)
    logp = torch.zeros(len(DOMAINS), VOCAB, dtype=torch.float64)
    for e, d in enumerate(DOMAINS):
        counter, seen = _counts(d)
        for v in range(VOCAB):
            logp[e, v] = math.log((counter[v] + lam) / (seen + lam * VOCAB))
    router = model.dume_routers()[0]
    torch.testing.assert_close(router.weight.double(), logp, rtol=1e-6, atol=1e-6)
    assert torch.equal(router.bias, torch.zeros_like(router.bias))
    # rows mixing the domains, left padding: top-1 = argmax of the (decayed) mean log-likelihood
    ids = torch.cat([domain_batches(d, 1, seed=9, pad=False)[0]["input_ids"] for d in DOMAINS], 1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    decay = 0.5 ** (1 / 3) if features == "vocab:3" else 1.0
    want = torch.zeros(ids.shape, dtype=torch.long)
    for b in range(ids.shape[0]):
        total, count = torch.zeros(len(DOMAINS), dtype=torch.float64), 0.0
        for t in range(ids.shape[1]):
            if mask[b, t]:
                total, count = total * decay + logp[:, ids[b, t]], count * decay + 1
            want[b, t] = (total / max(count, 1e-300)).argmax() if count else 0
    seen = []
    model.dume_state.on_decision = lambda index, experts: seen.append(experts)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    model.dume_state.on_decision = None
    real = mask.bool()
    assert len(seen) == 1 and torch.equal(seen[0][real], want[real])
    assert len(set(want[real].tolist())) >= 2  # the rows do change expert


def test_add_and_remove_expert_equal_from_scratch_builds(experts):
    two, stats = _build(experts, ["a", "b"])
    added, added_stats = fastdume.add_expert(two, experts["c"], "c", domain_batches("c"), stats)
    full, full_stats = _build(experts, DOMAINS)
    for key, value in full.state_dict().items():
        torch.testing.assert_close(added.state_dict()[key], value, rtol=0, atol=0, msg=key)
    for d in DOMAINS:
        assert torch.equal(added_stats.colsum(d), full_stats.colsum(d)), d
    removed, removed_stats = fastdume.remove_expert(full, "b", full_stats)
    ac, _ = _build(experts, ["a", "c"])
    for key, value in ac.state_dict().items():
        torch.testing.assert_close(removed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert removed_stats.domains == ["a", "c"]


def test_statistics_files_round_trip_and_refuse_other_options(experts, tmp_path):
    model, stats = _build(experts, DOMAINS)
    path = tmp_path / "s.safetensors"
    stats.save(path)
    loaded = RouterStats.load(path, model=model)
    assert loaded.options == {"routed": "model", "features": "vocab", "depth": "single"}
    for d in DOMAINS:
        assert torch.equal(loaded.colsum(d), stats.colsum(d))
        assert torch.equal(loaded.count(d), stats.count(d))
    context = _upcycle(experts, DOMAINS, features="context")
    with pytest.raises(ValueError, match="features='vocab'.*features='context'"):
        fit_router(context, loaded)
    context_stats = collect_stats(context, "a", domain_batches("a"), progress=False)
    with pytest.raises(ValueError, match=r"\(1, 64\), expected \(1, 256\)"):
        loaded + context_stats
    unknown = RouterStats(1, VOCAB, ["a"])  # no options recorded: hidden-state statistics
    with pytest.raises(ValueError, match="holds token counts, these hold hidden-state"):
        unknown += loaded


def test_bad_input_raises_naming_what_is_wrong(experts):
    with pytest.raises(ValueError, match="depth must be 'single'"):
        fastdume.upcycle([experts[d] for d in DOMAINS], routed="model", features="vocab",
                         depth="layer", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="half-life >= 1"):
        _upcycle(experts, DOMAINS, features="vocab:0.5")
    model, stats = _build(experts, DOMAINS, routed="mlp")
    with pytest.raises(ValueError, match="lam must be > 0"):
        fit_router(model, stats, lam=0.0)
    with pytest.raises(ValueError, match="input_ids are required"):
        model(inputs_embeds=torch.randn(1, 4, model.config.hidden_size))
    with pytest.raises(ValueError, match=r"input_ids must be in 0\.\.255"):
        stats.update_tokens(torch.tensor([[3, 256]]), "a")
    with pytest.raises(ValueError, match="use update"):
        RouterStats(1, 8, ["a"]).update_tokens(torch.tensor([[1]]), "a")
