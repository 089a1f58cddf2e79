"""The SmolLM2 tier's recipes, on the tiny test zoo (fast; no SmolLM2 needed): --full fine-tunes
every weight into its own cache folder, the default only the MLPs; --vocab-stats-tokens."""

import torch
import transformers

from fastdume.data import load_tokenizer
from fastdume.eval.smollm2 import SmolConfig, experts


def _state(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_full_experts_change_every_weight_and_mlp_experts_only_mlps(test_zoo, tmp_path):
    tok = load_tokenizer()
    base = _state(test_zoo.base)
    kw = dict(domains=("code",), steps=2, seq_len=32, batch_size=2, lr=1e-2)
    mlp = experts(SmolConfig(**kw), tmp_path, test_zoo.base, tok)["code"]
    full = experts(SmolConfig(full=True, **kw), tmp_path, test_zoo.base, tok)["code"]
    assert mlp.parent.name == "s2-lr0.01-L32-B2-seed0"
    assert full.parent.name == "full-" + mlp.parent.name  # its own cache folder
    for name, state in (("mlp", _state(mlp)), ("full", _state(full))):
        for key, value in base.items():
            changed = not torch.equal(state[key], value)
            if ".mlp." in key:
                assert changed, (name, key)
            else:
                assert changed == (name == "full"), (name, key)


def test_vocab_rows_count_their_own_statistics_budget(test_zoo):
    """--vocab-stats-tokens: vocabulary rows fit on that many tokens (recorded in the row), the
    hidden-state rows on stats_tokens; each row = the Python API on the same budget."""
    import fastdume
    from fastdume.data import batches
    from fastdume.eval.methods import Bench
    from fastdume.eval.metrics import evaluate
    from fastdume.eval.runner import PAPER
    from fastdume.eval.smollm2 import _whole_model_rows, markdown

    tok, domains = load_tokenizer(), test_zoo.domains[:2]
    paths = {d: test_zoo.experts[d] for d in domains}

    def batches_of(domain, split):
        cap = None if split == "train" else 1
        return batches(tok, domain, split, test_zoo.config["seq_len"], 4, cap, seed=5)

    cfg = SmolConfig(domains=tuple(domains), stats_tokens=300, vocab_stats_tokens=700,
                     model_rows="vocab:4/single,context/single")  # fmt: skip
    res = {"config": {"domains": domains}, "cross": {}, "methods": {}, "timings": {}}
    bench = Bench(batches_of, list(domains), res, progress=False)
    bench.dense_own = dict.fromkeys(domains, 10.0)
    _whole_model_rows(cfg, bench, paths)
    for features, tokens in (("vocab:4", 700), ("context", 300)):
        row = res["methods"][f"DUME whole model [{features}, single]"]
        assert row["stats_tokens"] == tokens
        model = fastdume.upcycle(list(paths.values()), domains=domains, routed="model",
                                 features=features, depth="single")  # fmt: skip
        stats = None
        for d in domains:
            stats = fastdume.collect_stats(model.eval(), d, batches_of(d, "train"), tokens,
                                           stats=stats, progress=False)  # fmt: skip
        fastdume.fit_router(model, stats, **PAPER)
        want = evaluate(model, batches_of, domains)["ppl"]
        for d in domains:
            assert abs(row["ppl"][d] - want[d]) <= 1e-4 * want[d], (features, d)
    assert "700 statistics tokens/domain" in markdown(res)
