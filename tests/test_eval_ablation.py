"""Ablation pieces: the variant grid, and layer-by-layer statistics against the oracle fit."""

import pytest
import torch

import fastdume
from fastdume.data import batches, load_tokenizer
from fastdume.eval.build import fit_sequential, nested_oracle_stats, oracle_stats
from fastdume.eval.runner import LAMS, PAPER, TRACE_LAMS, EvalConfig, _ablation_grid, run_ablations


def test_each_ablation_changes_one_thing_from_the_paper():
    cfg = EvalConfig(stats_tokens=50_000)
    grid = _ablation_grid(cfg)
    assert grid[0] == ("paper defaults", PAPER, "oracle", 50_000, 1)
    names = [g[0] for g in grid]
    assert len(set(names)) == len(names)
    for name, kwargs, mode, tokens, k in grid[1:]:
        changed = {key for key in PAPER if kwargs[key] != PAPER[key]}
        changed |= {"lam"} if kwargs["lam_mode"] != "absolute" else set()
        others = (mode != "oracle") + (tokens != 50_000) + (k != 1)
        assert len(changed) + others >= 1, name
        assert others <= 1 and (others == 0 or not changed), name


def test_sequential_layer0_equals_oracle_fit_and_later_layers_differ(test_zoo):
    zoo, tok = test_zoo, load_tokenizer()

    def batches_of(d, split):
        return batches(tok, d, split, zoo.config["seq_len"], 4)

    experts = [zoo.experts[d] for d in zoo.domains]
    oracle = fastdume.upcycle(experts, domains=zoo.domains)
    fastdume.fit_router(oracle, oracle_stats(oracle, batches_of, zoo.domains, 500, False))
    seq = fastdume.upcycle(experts, domains=zoo.domains)
    fit_sequential(seq, batches_of, zoo.domains, 500, dict(PAPER), progress=False)
    # Layer 0's input does not depend on routing: same tokens, same statistics, same router.
    r_o, r_s = oracle.dume_layers()[0].router, seq.dume_layers()[0].router
    assert torch.allclose(r_o.weight, r_s.weight, atol=1e-5)
    assert torch.allclose(r_o.bias, r_s.bias, atol=1e-5)
    # Later layers see inputs shaped by layer 0's learned (not oracle) routing.
    assert not torch.allclose(oracle.dume_layers()[1].router.weight,
                              seq.dume_layers()[1].router.weight, atol=1e-5)  # fmt: skip


def _capped(zoo, tok, cap):
    def batches_of(d, split):
        return batches(tok, d, split, zoo.config["seq_len"], 4, cap if split == "train" else 1)

    return batches_of


def test_nested_stats_equal_separate_passes_and_stop_at_the_corpus(test_zoo):
    zoo, tok = test_zoo, load_tokenizer()
    model = fastdume.upcycle([zoo.experts[d] for d in zoo.domains], domains=zoo.domains)
    batches_of = _capped(zoo, tok, 4)  # 4 batches x 4 rows x 64 tokens: < 1,024 per domain
    nested = nested_oracle_stats(model, batches_of, zoo.domains, (300, 700, 10**6), False)
    assert sorted(nested) == [300, 700, 10**6]
    for n in (300, 700):
        ref = oracle_stats(model, batches_of, zoo.domains, n, False)
        for d in zoo.domains:
            assert nested[n].tokens(d) == ref.tokens(d) == n
            assert torch.allclose(nested[n].gram(d), ref.gram(d), rtol=1e-5, atol=1e-3)
            assert torch.allclose(nested[n].colsum(d), ref.colsum(d), rtol=1e-5, atol=1e-3)
    every = oracle_stats(model, batches_of, zoo.domains, None, False)
    for d in zoo.domains:
        assert 700 < nested[10**6].tokens(d) == every.tokens(d) < 1024
        assert torch.allclose(nested[10**6].gram(d), every.gram(d), rtol=1e-5, atol=1e-3)


def test_routers_only_ablations_cli(test_zoo, tmp_path):
    import contextlib
    import io
    import json

    from fastdume.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["eval", "--preset", "test", "--quick", "--routers-only", "--ablations",
                     "--eval-batches", "1", "--stats-tokens", "1000", "--ablation-tokens",
                     "500,1000", "--no-progress", "--model-rows", "none", "--mixed-rows", "0",
                     "--json", str(tmp_path / "a.json")])  # fmt: skip
    assert code == 0
    res = json.loads((tmp_path / "a.json").read_text())
    assert set(res["methods"]) == {"MoE oracle routing", "MoE random routing", "DUME k=1",
                                   "DUME k=2"}  # fmt: skip
    rows = {r["name"]: r for r in res["ablations"]}
    want = {f"lam={x:g}" for x in LAMS if x != PAPER["lam"]}
    want |= {f"lam={x:g} x tr(A)/dim" for x in TRACE_LAMS}
    want |= {"paper defaults", "no intercept", "no normalisation", "domain balancing",
             "sequential statistics", "k=2", "stats tokens=500"}  # fmt: skip
    assert set(rows) == want  # 1,000 tokens is the paper-defaults row itself
    assert rows["stats tokens=500"]["stats_tokens"] == {d: 500 for d in test_zoo.domains}
    assert rows["paper defaults"]["ppl"] == res["methods"]["DUME k=1"]["ppl"]
    assert rows["k=2"]["ppl"] == res["methods"]["DUME k=2"]["ppl"]
    assert "### Ablations" in out.getvalue()


def test_ablation_tokens_beyond_the_corpus_are_labelled_and_deduplicated(test_zoo):
    zoo, tok = test_zoo, load_tokenizer()
    cfg = EvalConfig.quick(stats_tokens=500, ablation_tokens=(10**6, 10**7), progress=False)
    dume = fastdume.upcycle([zoo.experts[d] for d in zoo.domains], domains=zoo.domains)
    batches_of = _capped(zoo, tok, 4)  # > 700 tokens per domain, < 1,024
    stats = nested_oracle_stats(dume, batches_of, zoo.domains, (500,), False)
    fastdume.fit_router(dume, stats[500])
    dense_own = dict.fromkeys(zoo.domains, 10.0)
    rows = run_ablations(cfg, zoo, dume, stats, batches_of, dense_own)
    names = [r["name"] for r in rows if r["name"].startswith("stats tokens")]
    assert len(names) == 1 and names[0].startswith("stats tokens=1,000,000 (used ")
    with pytest.raises(ValueError, match="ablation_tokens must be positive ints"):
        EvalConfig(ablation_tokens=(0,)).check()


@pytest.mark.parametrize("features", ["token", "context"])
def test_sequential_whole_model_router0_is_the_oracle_fit(test_zoo, features):
    from fastdume.eval.build import build_routed

    zoo, tok = test_zoo, load_tokenizer()

    def batches_of(d, split):
        return batches(tok, d, split, zoo.config["seq_len"], 4)

    experts = [zoo.experts[d] for d in zoo.domains]
    opts = dict(routed="model", features=features, depth="layer")
    oracle = build_routed(experts, zoo.domains, batches_of, 500, PAPER, "oracle", False, **opts)
    seq = build_routed(experts, zoo.domains, batches_of, 500, PAPER, "sequential", False, **opts)
    r_o, r_s = oracle.dume_routers(), seq.dume_routers()
    # Router 0 reads the fixed token table: its statistics do not depend on any routing.
    assert torch.allclose(r_o[0].weight, r_s[0].weight, atol=1e-5)
    assert torch.allclose(r_o[0].bias, r_s[0].bias, atol=1e-5)
    # Router 1 sees block 1's input after block 0 ran the expert router 0 chose, not the oracle.
    assert not torch.allclose(r_o[1].weight, r_s[1].weight, atol=1e-5)
    # With one router ("single") the sequential fit is the oracle fit.
    opts["depth"] = "single"
    one = build_routed(experts, zoo.domains, batches_of, 500, PAPER, "oracle", False, **opts)
    one_seq = build_routed(experts, zoo.domains, batches_of, 500, PAPER, "sequential", False,
                           **opts)  # fmt: skip
    assert torch.allclose(one.dume_routers()[0].weight, one_seq.dume_routers()[0].weight,
                          atol=1e-5)  # fmt: skip


def test_sequential_fit_of_the_vocabulary_router_is_the_oracle_fit(test_zoo):
    """One router reading token ids: no earlier decision can change its statistics."""
    from fastdume.eval.build import build_routed

    zoo, tok = test_zoo, load_tokenizer()

    def batches_of(d, split):
        return batches(tok, d, split, zoo.config["seq_len"], 4)

    experts = [zoo.experts[d] for d in zoo.domains]
    opts = dict(routed="model", features="vocab:16", depth="single")
    one = build_routed(experts, zoo.domains, batches_of, 500, PAPER, "oracle", False, **opts)
    seq = build_routed(experts, zoo.domains, batches_of, 500, PAPER, "sequential", False, **opts)
    assert torch.equal(one.dume_routers()[0].weight, seq.dume_routers()[0].weight)
    assert not torch.equal(one.dume_routers()[0].weight[0], one.dume_routers()[0].weight[1])
