"""Which model a set of router statistics belongs to: its router shape and a hash of its shared
weights (statistics taken on other shared weights must never be mixed or fitted)."""

import hashlib
import math

import torch


def router_shape(model):
    layers = model.dume_layers()
    if not layers:
        raise ValueError("model has no DumeMoE layers (expected a DumeForCausalLM)")
    return len(layers), layers[0].router.weight.shape[1]


def shared_fingerprint(model, sample=4096):
    """Hash of the model's shared (non-expert, non-router) weights.

    Each tensor contributes its name, shape and an evenly strided sample of at most `sample`
    values rounded to bf16, so the hash is cheap for any model size and the same for the model
    loaded in fp32, bf16 or on another device.
    """
    skip = set()
    for layer in model.dume_layers():
        skip.update(id(p) for p in layer.experts.parameters())
        skip.update(id(p) for p in layer.router.parameters())
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if id(param) in skip:
            continue
        flat = param.detach().reshape(-1)
        picked = flat[:: max(1, math.ceil(flat.numel() / sample))]
        values = picked.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()
        digest.update(f"{name}:{tuple(param.shape)}:".encode())
        digest.update(values)
    return digest.hexdigest()


def check_model(stats, model, what="stats"):
    """Raise unless `stats` were taken on a model of this size and these shared weights."""
    num_layers, hidden = router_shape(model)
    if (stats.num_layers, stats.hidden_size) != (num_layers, hidden):
        raise ValueError(
            f"{what} has (num_layers, hidden_size) = {(stats.num_layers, stats.hidden_size)}, "
            f"but the model has {(num_layers, hidden)}"
        )
    if stats.fingerprint is not None:
        mine = shared_fingerprint(model)
        if stats.fingerprint != mine:
            raise ValueError(
                f"{what} was collected on a model with other shared weights (fingerprint "
                f"{stats.fingerprint[:12]}..., this model {mine[:12]}...)"
            )
