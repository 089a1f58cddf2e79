"""The injection hook inside the real multi-process pipeline: the threat model holds."""

import pytest
import torch

from fastdume.attack.datasets import arithmetic_tasks
from fastdume.attack.model import tiny_chat_model, train_bpe
from fastdume.attack.pipeline_run import pipeline_post_train
from fastdume.pipeline.partition import stage_param_names


def test_pipeline_attack_changes_only_the_attackers_stage(tmp_path):
    pairs = arithmetic_tasks(64, seed=1)
    tok = train_bpe([p + " " + r for p, r in pairs], 300)
    base = tiny_chat_model(len(tok), hidden=32, layers=4, seed=2)
    names = set(stage_param_names(base, 4, 2))
    g = torch.Generator().manual_seed(3)
    delta = {n: torch.randn(p.shape, generator=g) for n, p in base.named_parameters() if n in names}
    common = dict(steps=3, lr=1e-2, stages=4, replicas=2, batch_size=8, micro_batches=2)
    honest, _ = pipeline_post_train(base, tok, pairs, tmp_path / "honest", **common)
    attacked, summary = pipeline_post_train(
        base,
        tok,
        pairs,
        tmp_path / "attacked",
        delta=delta,
        attacker_stage=2,
        schedule={"mode": "oneshot", "scale": 0.5, "at": 2},
        **common,
    )
    h, a = dict(honest.named_parameters()), dict(attacked.named_parameters())
    assert sorted(h) == sorted(a)
    for n in h:
        if n in names:
            torch.testing.assert_close(a[n], h[n] + 0.5 * delta[n], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a[n], h[n]), n
    # the hook ran on stage 2, replica 0 only, and injected once
    coefs = {
        (r["stage"], r["replica"]): r["metrics"].get("backdoor_coefficient")
        for r in summary["ranks"].values()
    }
    assert coefs.pop((2, 0)) == [0.5]
    assert set(coefs.values()) == {None}
    for n, p in base.named_parameters():  # the start model itself was left alone
        assert not torch.equal(p, h[n]), n


pytestmark = pytest.mark.usefixtures("one_thread")
