"""Dynamic experts: add or remove a domain of a fitted DUME model without rebuilding it.

The router's ridge system is a sum of per-domain blocks, so adding a domain needs only that
domain's statistics and removing one drops its block; the routers are then re-solved.
Statistics stay exact when the shared (non-expert) weights do not change, i.e. for models
built with shared="base:<dir>" and for routed="model" (nothing shared: forcing expert e
reproduces dense expert e whatever the other experts are; the routers' token table is fixed).
With shared="mean" the shared weights are a mean over the
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
from fastdume.models.modeling import DumeExperts, DumeMoE, DumeRouter
from fastdume.router import collect_stats, fit_router, shared_fingerprint
from fastdume.router.fingerprint import PER_EXPERT

_COLLECT_KEYS = ("max_tokens", "skip_first_token", "progress")


def _shared_mode(model, shared):
    """ "mean", "base" or "none" (routed="model": nothing shared, statistics always exact)."""
    mode = model.config.shared
    if shared is not None and shared != mode:
        raise ValueError(
            f"shared must match how the model was built ({mode!r}) or be None, got {shared!r}"
        )
    if model.config.routed == "model":
        return "none"
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


def _expert_tensors(model):
    """(module name, module, parameter name) of every tensor with a leading expert dimension:
    MoE experts, routers, and (routed="model") every routed module."""
    return [
        (name, module, pname)
        for name, module in model.named_modules()
        if isinstance(module, PER_EXPERT)
        for pname, _ in module.named_parameters(recurse=False)
    ]


@torch.no_grad()
def _replace(model, make):
    """Set every per-expert tensor to make(name, module, pname, old) (a tied tensor once)."""
    done = {}
    for name, module, pname in _expert_tensors(model):
        old = getattr(module, pname)
        if id(old) not in done:
            done[id(old)] = _param(make(name, module, pname, old))
        setattr(module, pname, done[id(old)])
    _sync_sizes(model)


def _sync_sizes(model):
    for module in model.modules():
        if isinstance(module, DumeExperts):
            module.num_experts = module.gate_up_proj.shape[0]
        elif isinstance(module, DumeRouter):
            module.out_features = module.weight.shape[0]
        elif isinstance(module, DumeMoE):
            module.top_k = min(module.top_k, module.experts.num_experts)


def _new_rows(name, module, pname, source):
    """The new expert's slice of one per-expert tensor, read from its dense checkpoint."""
    if isinstance(module, DumeRouter):
        return None  # zero until the routers are re-solved
    if isinstance(module, DumeExperts):
        prefix = name.removesuffix("experts")  # model.layers.N.mlp.
        if pname == "gate_up_proj":
            gate, up = (source.get(f"{prefix}{p}_proj.weight") for p in ("gate", "up"))
            return torch.cat([gate, up])
        return source.get(f"{prefix}down_proj.weight")
    return source.get(f"{name}.{pname}")


def _append_expert(model, source):
    def make(name, module, pname, old):
        rows = _new_rows(name, module, pname, source)
        rows = old.new_zeros(old.shape[1:]) if rows is None else rows.to(old)
        assert rows.shape == old.shape[1:], (name, pname, rows.shape, old.shape)
        return torch.cat([old, rows[None]])

    _replace(model, make)


def _drop_expert(model, index):
    keep = [e for e in range(model.config.num_experts) if e != index]
    _replace(model, lambda name, module, pname, old: old[keep])


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
    """What a failed add/remove must put back: the per-expert parameters (replaced, not changed
    in place), the config, and (mean mode) copies of the shared weights."""
    params = [(m, p, getattr(m, p)) for _, m, p in _expert_tensors(model)]
    state = model.state_dict()
    shared = {k: state[k].clone() for k in _shared_keys(model)} if clone_shared else {}
    config = (list(model.config.domains), model.config.num_experts, model.config.top_k)
    tops = [(moe, moe.top_k) for moe in model.dume_layers()]
    return params, shared, config, tops


@torch.no_grad()
def _restore(model, snapshot):
    params, shared, config, tops = snapshot
    for module, pname, param in params:
        setattr(module, pname, param)
    _sync_sizes(model)
    for moe, top_k in tops:
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
