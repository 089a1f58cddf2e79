"""Dynamic experts: add or remove a domain of a fitted DUME model without rebuilding it.

The router's ridge system is a sum of per-domain blocks, so adding a domain needs only that
domain's statistics and removing one drops its block; the routers are then re-solved.
Statistics stay exact when the shared (non-expert) weights do not change, i.e. for models
built with shared="base:<dir>". With shared="mean" the shared weights are a mean over the
experts and move with every change: pass recollect=True (and batches for every domain) to
re-run the statistics, otherwise the old domains' statistics are approximate (warned).
"""

import contextlib
import types
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from fastdume.merge.sources import check_configs, check_tensors, open_sources
from fastdume.router import collect_stats, fit_router, shared_fingerprint

_COLLECT_KEYS = ("max_tokens", "skip_first_token", "progress")


def _shared_mode(model, shared):
    mode = model.config.shared
    if shared is not None and shared != mode:
        raise ValueError(
            f"shared must match how the model was built ({mode!r}) or be None, got {shared!r}"
        )
    return "mean" if mode == "mean" else "base"


def _dense_layout(model):
    from fastdume.merge.upcycle import dense_layout

    return dense_layout(model.config.dense_config())


def _check_expert(model, source):
    dense = model.config.dense_config()
    reference = types.SimpleNamespace(config=dense, label="the DUME model's dense config")
    check_configs([reference, source])
    check_tensors([source], None, _dense_layout(model))


def _shared_keys(model):
    return [k for k in _dense_layout(model) if ".mlp." not in k]


def _param(t):
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.contiguous())


def _resize_params(moe, gate_up, down, router_weight, router_bias):
    moe.experts.gate_up_proj = _param(gate_up)
    moe.experts.down_proj = _param(down)
    moe.experts.num_experts = gate_up.shape[0]
    moe.router.weight = _param(router_weight)
    moe.router.bias = _param(router_bias)
    moe.router.out_features = gate_up.shape[0]
    moe.top_k = min(moe.top_k, gate_up.shape[0])


@torch.no_grad()
def _append_expert(model, source):
    inter = model.config.base_config["intermediate_size"]
    for layer, moe in enumerate(model.dume_layers()):
        old_gu, old_down = moe.experts.gate_up_proj, moe.experts.down_proj
        prefix = f"model.layers.{layer}.mlp."
        gate = source.get(prefix + "gate_proj.weight")
        up = source.get(prefix + "up_proj.weight")
        new_gu = torch.cat([gate, up]).to(old_gu)
        new_down = source.get(prefix + "down_proj.weight").to(old_down)
        assert new_gu.shape[0] == 2 * inter
        weight, bias = moe.router.weight, moe.router.bias
        _resize_params(
            moe,
            torch.cat([old_gu, new_gu[None]]),
            torch.cat([old_down, new_down[None]]),
            torch.cat([weight, weight.new_zeros(1, weight.shape[1])]),
            torch.cat([bias, bias.new_zeros(1)]),
        )


@torch.no_grad()
def _drop_expert(model, index):
    keep = [e for e in range(model.config.num_experts) if e != index]
    for moe in model.dume_layers():
        _resize_params(
            moe,
            moe.experts.gate_up_proj[keep],
            moe.experts.down_proj[keep],
            moe.router.weight[keep],
            moe.router.bias[keep],
        )


@torch.no_grad()
def _update_mean(model, source, count, sign):
    """Shared weights: mean over `count` models -> mean with one added (+1) or removed (-1)."""
    state = model.state_dict()
    new_count = count + sign
    for key in _shared_keys(model):
        target = state[key]
        total = target.to(torch.float32) * count + sign * source.get(key).to(torch.float32)
        target.copy_(total / new_count)


def _snapshot(model, clone_shared):
    """What a failed add/remove must put back: expert/router parameters (replaced, not changed
    in place), the config, and (mean mode) copies of the shared weights."""
    layers = [
        (moe.experts.gate_up_proj, moe.experts.down_proj, moe.router.weight, moe.router.bias)
        for moe in model.dume_layers()
    ]
    state = model.state_dict()
    shared = {k: state[k].clone() for k in _shared_keys(model)} if clone_shared else {}
    config = (list(model.config.domains), model.config.num_experts, model.config.top_k)
    tops = [moe.top_k for moe in model.dume_layers()]
    return layers, shared, config, tops


@torch.no_grad()
def _restore(model, snapshot):
    layers, shared, config, tops = snapshot
    for moe, params, top_k in zip(model.dume_layers(), layers, tops, strict=True):
        _resize_params(moe, *params)
        moe.top_k = top_k
    state = model.state_dict()
    for key, value in shared.items():
        state[key].copy_(value)
    model.config.domains, model.config.num_experts, model.config.top_k = config


@contextlib.contextmanager
def _transaction(model, clone_shared):
    snapshot = _snapshot(model, clone_shared)
    try:
        yield
    except BaseException:
        _restore(model, snapshot)
        raise


def _set_domains(model, domains):
    model.config.domains = list(domains)
    model.config.num_experts = len(domains)
    model.config.top_k = min(model.config.top_k, len(domains))


def _collect_kwargs(kwargs):
    collect = {k: kwargs.pop(k) for k in _COLLECT_KEYS if k in kwargs}
    return collect, kwargs


def _recollect(model, batches, collect_kw):
    if not isinstance(batches, Mapping):
        raise ValueError(
            "recollect=True needs batches as a dict domain -> batches for every domain "
            f"{model.config.domains}, got {type(batches).__name__}"
        )
    missing = [d for d in model.config.domains if d not in batches]
    if missing:
        raise ValueError(f"recollect=True: batches lack the domains {missing}")
    stats = None
    for domain in model.config.domains:
        stats = collect_stats(model, domain, batches[domain], stats=stats, **collect_kw)
    return stats


def _warn_stale(what):
    warnings.warn(
        f"{what} changed the mean-merged shared weights, so the statistics of the other "
        "domains are now approximate; pass recollect=True with batches for every domain to "
        "re-run them (or build with shared='base:<dir>', which keeps them exact)",
        UserWarning,
        stacklevel=3,
    )


def add_expert(model, expert, domain, batches, stats, shared=None, recollect=False, **kwargs):
    """Add `expert` (HF dir or PreTrainedModel) as a new domain and re-fit the routers.

    batches: the new domain's batches, or (recollect=True) a dict domain -> batches for every
    domain including the new one. stats: RouterStats of the model's current domains.
    kwargs: solve_router options, plus collect_stats' max_tokens / skip_first_token / progress.
    Returns (model, stats) with stats covering the new set of domains. Changes the model in place.
    """
    domains = list(model.config.domains)
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"domain must be a non-empty str, got {domain!r}")
    if domain in domains:
        raise ValueError(f"domain {domain!r} is already an expert of the model ({domains})")
    mode = _shared_mode(model, shared)
    collect_kw, solve_kw = _collect_kwargs(dict(kwargs))
    if not recollect:
        _check_stats(model, stats, domains)
    elif not isinstance(batches, Mapping) or domain not in batches:
        raise ValueError(f"recollect=True needs batches as a dict with every domain + {domain!r}")
    with _transaction(model, clone_shared=mode == "mean"):
        with open_sources([expert]) as (sources, _):
            source = sources[0]
            _check_expert(model, source)
            if mode == "mean":
                _update_mean(model, source, len(domains), +1)
            _append_expert(model, source)
        _set_domains(model, [*domains, domain])
        if recollect:
            stats = _recollect(model, batches, collect_kw)
        else:
            stats = stats.select(domains)
            if mode == "mean":
                _warn_stale(f"adding expert {domain!r}")
                stats.fingerprint = shared_fingerprint(model)
            stats = collect_stats(model, domain, batches, stats=stats, **collect_kw)
        fit_router(model, stats, **solve_kw)
    return model, stats


def remove_expert(
    model, domain, stats, shared=None, recollect=False, batches=None, expert=None, **kwargs
):
    """Remove `domain`'s expert and re-fit the routers from the remaining domains' statistics.

    With shared="mean", pass the removed dense `expert` (dir or model) to take it out of the
    shared mean, and recollect=True with batches (dict domain -> batches) to refresh the
    statistics; otherwise the shared weights or statistics are approximate (warned).
    Returns (model, stats) with stats covering the remaining domains. Changes the model in place.
    """
    domains = list(model.config.domains)
    if domain not in domains:
        raise ValueError(f"domain must be one of the model's domains {domains}, got {domain!r}")
    if len(domains) == 1:
        raise ValueError(f"cannot remove {domain!r}: it is the model's only expert")
    mode = _shared_mode(model, shared)
    collect_kw, solve_kw = _collect_kwargs(dict(kwargs))
    remaining = [d for d in domains if d != domain]
    if not recollect:
        _check_stats(model, stats, remaining)
    with _transaction(model, clone_shared=mode == "mean"):
        if mode == "mean":
            _mean_without(model, domain, expert, len(domains))
        _drop_expert(model, domains.index(domain))
        _set_domains(model, remaining)
        if recollect:
            stats = _recollect(model, batches, collect_kw)
        else:
            stats = stats.select(remaining)
            if mode == "mean" and expert is not None:
                _warn_stale(f"removing expert {domain!r}")
                stats.fingerprint = shared_fingerprint(model)
        fit_router(model, stats, **solve_kw)
    return model, stats


def _mean_without(model, domain, expert, count):
    if expert is None:
        warnings.warn(
            f"removing {domain!r} without its dense expert: the shared weights keep its "
            "share of the mean (pass expert=... to take it out)",
            UserWarning,
            stacklevel=3,
        )
        return
    with open_sources([expert]) as (sources, _):
        _check_expert(model, sources[0])
        _update_mean(model, sources[0], count, -1)


def _check_stats(model, stats, needed):
    from fastdume.router import RouterStats, check_model

    if not isinstance(stats, RouterStats):
        raise TypeError(f"stats must be RouterStats, got {type(stats).__name__}")
    missing = [d for d in needed if d not in stats.domains]
    if missing:
        raise ValueError(f"stats lack the domains {missing} (they hold {stats.domains})")
    check_model(stats, model)
