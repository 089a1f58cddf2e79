"""Tiny random dense configs and DUME models for the model/upcycle/export tests."""

import torch
import transformers

FAMILY_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}
FAMILIES = tuple(FAMILY_CONFIGS)


def tiny_config(family, **overrides):
    """hidden 64, 2 layers, 4 heads, 2 kv heads, inter 128, vocab 256 (as fastdume.data.zoo)."""
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    fields.update(overrides)
    # Qwen3's default head_dim is 128 whatever the hidden size: keep heads * head_dim == hidden.
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    return FAMILY_CONFIGS[family](**fields)


def tiny_dense(family, seed=0, **overrides):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()


def tiny_dume(family, domains=("a", "b", "c"), top_k=1, temperature=1.0, seed=0, **overrides):
    """A random DumeForCausalLM whose routers are large enough to spread tokens over experts."""
    from fastdume.moe import DumeConfig, DumeForCausalLM

    torch.manual_seed(seed)
    config = DumeConfig(
        base_config=tiny_config(family, **overrides).to_dict(),
        domains=list(domains),
        top_k=top_k,
        router_temperature=temperature,
    )
    model = DumeForCausalLM(config).eval()
    with torch.no_grad():
        for moe in model.dume_layers():
            moe.router.weight.normal_(0.0, 1.0)
            moe.router.bias.normal_(0.0, 0.5)
    return model
