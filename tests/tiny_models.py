"""Tiny random DUME models for the model/upcycle/export tests (dense ones from fastdume.data)."""

import torch

from fastdume.data.tiny import FAMILIES, tiny_config
from fastdume.data.tiny import tiny_model as tiny_dense

__all__ = ["FAMILIES", "tiny_config", "tiny_dense", "tiny_dume"]


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
