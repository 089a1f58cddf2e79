"""DUME models for the evaluation: oracle statistics (the paper) or layer-by-layer statistics."""

import torch
from tqdm.auto import tqdm

from fastdume.router import RouterStats, collect_stats, fit_router, solve_router
from fastdume.upcycle import upcycle

STATS_MODES = ("oracle", "sequential")


def oracle_stats(model, batches_of, domains, max_tokens, progress=True):
    """One pass per domain with every layer forced to that domain's expert (the paper)."""
    stats = None
    for d in domains:
        stats = collect_stats(
            model, d, batches_of(d, "train"), max_tokens=max_tokens, stats=stats, progress=progress
        )
    return stats


class _Stop(Exception):
    pass


def _layer_stats(model, layer, batches_of, domains, max_tokens):
    """Statistics of one layer's MoE input, earlier layers routed by their fitted routers."""
    moe = model.dume_layers()[layer]
    stats = RouterStats(1, moe.router.weight.shape[1], domains)
    state = {}

    def hook(module, args):
        x = args[0].reshape(*state["mask"].shape, -1)
        stats.update(0, x, state["domain"], state["mask"])
        raise _Stop

    handle = moe.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for d in domains:
                seen = 0
                for batch in batches_of(d, "train"):
                    keep = batch["attention_mask"].bool()
                    keep &= (keep.reshape(-1).cumsum(0) <= max_tokens - seen).reshape(keep.shape)
                    state.update(mask=keep, domain=d)
                    try:
                        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    except _Stop:
                        pass
                    seen += int(keep.sum())
                    if seen >= max_tokens:
                        break
    finally:
        handle.remove()
    return stats


def fit_sequential(model, batches_of, domains, max_tokens, solve_kwargs, progress=True):
    """Fit layer 0, then collect layer 1's statistics under layer 0's routing, and so on."""
    model.eval()
    for layer in tqdm(range(len(model.dume_layers())), desc="sequential fit", disable=not progress):
        stats = _layer_stats(model, layer, batches_of, domains, max_tokens)
        weight, bias = solve_router(stats, domains=domains, **solve_kwargs)
        router = model.dume_layers()[layer].router
        with torch.no_grad():
            router.weight.copy_(weight[0])
            router.bias.copy_(bias[0])
    return model


def build_dume(zoo, batches_of, stats_tokens, solve_kwargs, stats_mode="oracle", progress=True):
    """Upcycle the zoo's experts and fit the routers -> (model, oracle stats or None)."""
    if stats_mode not in STATS_MODES:
        raise ValueError(f"stats_mode must be one of {STATS_MODES}, got {stats_mode!r}")
    model = upcycle([zoo.experts[d] for d in zoo.domains], domains=zoo.domains, progress=False)
    model.eval()
    if stats_mode == "sequential":
        return fit_sequential(
            model, batches_of, zoo.domains, stats_tokens, solve_kwargs, progress
        ), None
    stats = oracle_stats(model, batches_of, zoo.domains, stats_tokens, progress)
    fit_router(model, stats, **solve_kwargs)
    return model, stats


def set_top_k(model, k):
    for layer in model.dume_layers():
        layer.top_k = k
    model.config.top_k = k
    return model
