"""Tiny random-init configs and models of the dense families DUME supports (architecture tests)."""

from __future__ import annotations

import torch

from fastdume.models.modeling import FAMILIES as DENSE_FAMILIES
from fastdume.models.modeling import family_class

FAMILIES = tuple(DENSE_FAMILIES)  # the dense families DUME supports
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_config(family: str, **overrides):
    """A tiny transformers config of `family` (hidden 64, 2 layers, 4 heads, 2 KV heads, ...)."""
    cls = family_class(family, 0)
    kwargs = {**TINY, **overrides}
    # Qwen3 defaults to head_dim=128 whatever the hidden size; keep heads * head_dim == hidden.
    kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    return cls(**kwargs)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A random-init XxxForCausalLM (fp32) of the tiny config; same seed -> same weights."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
