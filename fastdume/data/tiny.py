"""Tiny random-init configs and models of the dense families DUME supports (architecture tests)."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
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


def _config_class(family: str):
    import transformers

    names = {
        "llama": "LlamaConfig",
        "mistral": "MistralConfig",
        "qwen2": "Qwen2Config",
        "qwen3": "Qwen3Config",
    }
    if family not in names:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return getattr(transformers, names[family])


def tiny_config(family: str, **overrides):
    """A tiny transformers config of `family` (hidden 64, 2 layers, 4 heads, 2 KV heads, ...)."""
    cls = _config_class(family)
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
