"""Merging baselines: uniform weight averaging, task arithmetic, random routers."""

import torch

__all__ = ["load_dense", "random_routers", "task_arithmetic", "uniform_average"]


def load_dense(path):
    """A saved dense model folder -> the model, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def uniform_average(paths):
    """Plain mean of the dense experts' parameters (the weight-averaging baseline)."""
    model = load_dense(paths[0])
    state = {k: v.float().clone() for k, v in model.state_dict().items()}
    for path in paths[1:]:
        for k, v in load_dense(path).state_dict().items():
            state[k] += v.float()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k] / len(paths))
    return model


def task_arithmetic(base_path, expert_paths, alpha):
    """base + alpha * sum_e (expert_e - base), over every parameter (fp32 accumulation)."""
    if not expert_paths:
        raise ValueError("expert_paths must name at least one expert, got none")
    model = load_dense(base_path)
    base = {k: v.float().clone() for k, v in model.state_dict().items()}
    delta = {k: torch.zeros_like(v) for k, v in base.items()}
    for path in expert_paths:
        for k, v in load_dense(path).state_dict().items():
            delta[k] += v.float() - base[k]
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(base[k] + alpha * delta[k])
    return model


def random_routers(model, seed=0, std=None):
    """Give every DumeMoE a Gaussian router (zero bias): routing unrelated to the domains.

    std defaults to 1/sqrt(hidden) so logits are O(1) like a fitted router's.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.dume_layers():
            w = layer.router.weight
            scale = std if std is not None else w.shape[1] ** -0.5
            w.copy_(torch.randn(w.shape, generator=gen) * scale)
            layer.router.bias.zero_()
    return model
