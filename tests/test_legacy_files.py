"""Files written before the package moved (fastdume at ba0a253: fastdume/modeling_dume.py,
fastdume/router.py) still load: a fitted two-expert DUME model, its router statistics and the
logits that version computed (tests/data/legacy, made by a script run once with that version)."""

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import fastdume

LEGACY = Path(__file__).parent / "data" / "legacy"


def test_a_model_saved_before_the_move_loads_and_computes_the_same_logits():
    model = AutoModelForCausalLM.from_pretrained(LEGACY / "model").eval()
    assert isinstance(model, fastdume.moe.DumeForCausalLM)
    expected = load_file(LEGACY / "expected.safetensors")
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)


def test_statistics_saved_before_the_move_load_and_refit_the_same_routers():
    model = AutoModelForCausalLM.from_pretrained(LEGACY / "model").eval()
    stats = fastdume.RouterStats.load(LEGACY / "router_stats.safetensors", model=model)
    assert stats.domains == ["a", "b"] and all(stats.tokens(d) == 48 for d in stats.domains)
    weight, bias = fastdume.solve_router(stats)
    for layer, w, b in zip(model.dume_layers(), weight, bias, strict=True):
        torch.testing.assert_close(layer.router.weight, w.float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.router.bias, b.float(), rtol=0, atol=1e-6)
