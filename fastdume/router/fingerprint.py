"""Which model a set of router statistics belongs to: its router shape and a hash of its shared
weights (statistics taken on other shared weights must never be mixed or fitted)."""

import hashlib
import math

import torch

from fastdume.models.modeling import DumeExperts, DumeRouter
from fastdume.models.routed import RoutedEmbedding, RoutedLinear, RoutedRMSNorm
from fastdume.models.routing import options_of


def router_shape(model):
    """(router count, router input size): the RouterStats shape of `model`."""
    routers = model.dume_routers()
    if not routers:
        raise ValueError("model has no DUME routers (expected a DumeForCausalLM)")
    return len(routers), routers[0].weight.shape[1]


PER_EXPERT = (DumeExperts, DumeRouter, RoutedLinear, RoutedEmbedding, RoutedRMSNorm)


def model_options(model):
    return options_of(model.config)


def _expert_or_router(model):
    """ids of the parameters that are per expert or routers (never part of the fingerprint)."""
    skip = set()
    for module in model.modules():
        if isinstance(module, PER_EXPERT):
            skip.update(id(p) for p in module.parameters(recurse=False))
    return skip


def shared_fingerprint(model, sample=4096):
    """Hash of the model's shared (non-expert, non-router) weights (routed="model": the
    routers' fixed token table).

    Each tensor contributes its name, shape and an evenly strided sample of at most `sample`
    values rounded to bf16, so the hash is cheap for any model size and the same for the model
    loaded in fp32, bf16 or on another device.
    """
    skip = _expert_or_router(model)
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
    mine = model_options(model)
    if stats.options is not None and stats.options != mine:
        raise ValueError(
            f"{what} was collected with routing options {_show(stats.options)}, but the model "
            f"has {_show(mine)}; collect statistics on this model"
        )
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


def _show(options):
    return ", ".join(f"{k}={v!r}" for k, v in options.items())
