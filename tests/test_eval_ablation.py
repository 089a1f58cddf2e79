"""Ablation pieces: the variant grid, and layer-by-layer statistics against the oracle fit."""

import torch

import fastdume
from fastdume.data import batches, load_tokenizer
from fastdume.eval.build import fit_sequential, oracle_stats
from fastdume.eval.runner import PAPER, EvalConfig, _ablation_grid


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
