"""Cost of the in-stage detectors against one training step of a stage, measured in the same
run: a stage of two Llama decoder layers (hidden 256) on 8 x 128 tokens, AdamW.

extra_info holds each detector's time as a share of the stage's training step
(forward + backward + optimiser step). Target from issue 8/9: a cheap statistical detector
under 5%.
"""

import time

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from fastdume.defense import TrafficStats, UpdateAudit, UpdateStats
from fastdume.pipeline.hooks import StageContext

H, TOKENS, BATCH = 256, 128, 8


def _stage():
    cfg = LlamaConfig(
        hidden_size=H,
        intermediate_size=688,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_hidden_layers=2,
    )
    layers = torch.nn.ModuleList([LlamaDecoderLayer(cfg, i) for i in range(2)])
    rope = LlamaRotaryEmbedding(cfg)
    params = {f"model.layers.{n}": p for n, p in layers.named_parameters()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.01)
    ctx = StageContext(
        stage=1,
        num_stages=4,
        replica=0,
        num_replicas=1,
        layer_range=(2, 4),
        params=params,
        optimizer=opt,
    )
    return layers, rope, ctx


def _train_step(layers, rope, ctx, x, hooks):
    pos = torch.arange(TOKENS).unsqueeze(0)
    emb = rope(x, pos)
    h = x
    for layer in layers:
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=emb)
        h = h[0] if isinstance(h, tuple) else h
    for hk in hooks:
        hk.on_activations(ctx, 0, h.detach())
    h.backward(torch.randn_like(h))
    for hk in hooks:
        hk.on_gradients(ctx, 0, torch.randn_like(h))
    ctx.grads = {n: p.grad for n, p in ctx.params.items()}
    for hk in hooks:
        hk.before_step(ctx, ctx.step)
    ctx.optimizer.step()
    with torch.no_grad():
        for hk in hooks:
            hk.after_step(ctx, ctx.step)
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.step += 1


@pytest.mark.parametrize("detector", [UpdateAudit, UpdateStats, TrafficStats])
def test_detector_cost_share(benchmark, detector):
    layers, rope, ctx = _stage()
    x = torch.randn(BATCH, TOKENS, H)
    _train_step(layers, rope, ctx, x, [])  # warm up (and give the optimiser its state)
    n = 2
    t0 = time.perf_counter()
    for _ in range(n):
        _train_step(layers, rope, ctx, x, [])
    base = (time.perf_counter() - t0) / n
    # A fresh detector: the audit would rightly flag the unaudited steps above.
    hook = detector()
    _train_step(layers, rope, ctx, x, [hook])
    ctx.metrics.clear()
    benchmark.pedantic(_train_step, args=(layers, rope, ctx, x, [hook]), rounds=n, iterations=1)
    spent = sum(ctx.metrics[f"{hook.name}.seconds"])
    rounds = len(ctx.metrics[f"{hook.name}.seconds"])
    benchmark.extra_info["step_seconds"] = base
    benchmark.extra_info["detector_share_of_step"] = spent / rounds / base
    assert max(ctx.metrics.get("audit.flag", [0.0])) == 0.0
