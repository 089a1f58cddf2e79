"""DUME models for the evaluation: oracle statistics (the paper) or layer-by-layer statistics."""

import contextlib

import torch
from tqdm.auto import tqdm

from fastdume.merge.upcycle import upcycle
from fastdume.models.modeling import forced_expert
from fastdume.router import RouterStats, collect_stats, fit_router, shared_fingerprint, solve_router

STATS_MODES = ("oracle", "sequential")


def oracle_stats(model, batches_of, domains, max_tokens, progress=True):
    """One pass per domain with every layer forced to that domain's expert (the paper)."""
    stats = None
    for d in domains:
        stats = collect_stats(
            model, d, batches_of(d, "train"), max_tokens=max_tokens, stats=stats, progress=progress
        )
    return stats


def nested_oracle_stats(model, batches_of, domains, token_counts, progress=True):
    """`oracle_stats` for several token budgets from one pass -> {budget: RouterStats}.

    The statistics for budget n hold each domain's first n tokens, the same tokens as
    `oracle_stats(..., max_tokens=n)`; a domain with fewer train tokens stops at all of them
    (`stats.tokens(domain)` says how many).
    """
    counts = sorted(set(token_counts))
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"token_counts must be positive ints, got {token_counts!r}")
    layers = model.dume_layers()
    L, H = len(layers), layers[0].router.weight.shape[1]
    fingerprint = shared_fingerprint(model)
    # One RouterStats per segment (counts[i-1], counts[i]] of each domain's tokens.
    parts = [RouterStats(L, H, domains, fingerprint) for _ in counts]
    bounds = torch.tensor([0, *counts])
    state = {}

    def make_hook(index):
        def hook(module, args):
            x = args[0].reshape(*state["mask"].shape, -1)
            for i, part in enumerate(parts):
                seg = state["mask"] & (state["pos"] > bounds[i]) & (state["pos"] <= bounds[i + 1])
                if seg.any():
                    part.update(index, x, state["domain"], seg)
            if index == L - 1:
                raise _Stop

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i)) for i, layer in enumerate(layers)]
    model.eval()
    try:
        with torch.no_grad():
            for e, d in enumerate(tqdm(domains, desc="nested stats", disable=not progress)):
                seen = 0
                with forced_expert(model, e):
                    for batch in batches_of(d, "train"):
                        keep = batch["attention_mask"].bool()
                        pos = (keep.reshape(-1).cumsum(0) + seen).reshape(keep.shape)
                        state.update(mask=keep & (pos <= counts[-1]), pos=pos, domain=d)
                        ids, mask = batch["input_ids"], batch["attention_mask"]
                        with contextlib.suppress(_Stop):
                            model(input_ids=ids, attention_mask=mask, use_cache=False)
                        seen += int(keep.sum())
                        if seen >= counts[-1]:
                            break
    finally:
        for handle in handles:
            handle.remove()
    out, total = {}, None
    for n, part in zip(counts, parts, strict=True):
        total = part.copy() if total is None else total + part
        out[n] = total
    for d in domains:
        if out[counts[0]].tokens(d) == 0:
            raise ValueError(f"no train tokens for domain {d!r}")
    return out


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


def _router_stats(model, index, batches_of, domains, max_tokens):
    """Statistics of router `index`'s features (any routing options), the routers before it
    deciding as fitted; the forward stops once they are seen."""
    state = model.dume_state
    stats = RouterStats(1, model.dume_routers()[index].weight.shape[1], domains)
    current = {}

    def recorder(i, features, mask):
        if i == index:
            stats.update(0, features, current["domain"], current["mask"])
            raise _Stop

    state.recorder = recorder
    try:
        with torch.no_grad():
            for d in domains:
                seen = 0
                for batch in batches_of(d, "train"):
                    keep = batch["attention_mask"].bool()
                    keep &= (keep.reshape(-1).cumsum(0) <= max_tokens - seen).reshape(keep.shape)
                    current.update(mask=keep, domain=d)
                    with contextlib.suppress(_Stop):
                        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False)  # fmt: skip
                    seen += int(keep.sum())
                    if seen >= max_tokens:
                        break
    finally:
        state.recorder = None
    return stats


def fit_sequential_routers(model, batches_of, domains, max_tokens, solve_kwargs, progress=True):
    """`fit_sequential` for any routing options: router 0 first, then router 1's statistics
    under router 0's decisions, and so on (a model with one router: the oracle fit's data)."""
    model.eval()
    routers = model.dume_routers()
    for index in tqdm(range(len(routers)), desc="sequential fit", disable=not progress):
        stats = _router_stats(model, index, batches_of, domains, max_tokens)
        weight, bias = solve_router(stats, domains=domains, **solve_kwargs)
        with torch.no_grad():
            routers[index].weight.copy_(weight[0])
            routers[index].bias.copy_(bias[0])
    return model


def build_routed(experts, domains, batches_of, stats_tokens, solve_kwargs, stats_mode="oracle",
                 progress=True, **options):  # fmt: skip
    """Upcycle with routing options (fastdume.upcycle's routed / features / depth / shared) and
    fit the routers on oracle or sequential statistics -> the model."""
    if stats_mode not in STATS_MODES:
        raise ValueError(f"stats_mode must be one of {STATS_MODES}, got {stats_mode!r}")
    model = upcycle(list(experts), domains=domains, progress=False, **options).eval()
    if stats_mode == "sequential":
        if getattr(model, "dume_state", None) is None:
            return fit_sequential(model, batches_of, domains, stats_tokens, solve_kwargs, progress)
        if len(model.dume_routers()) > 1:  # one router: sequential statistics are the oracle's
            return fit_sequential_routers(model, batches_of, domains, stats_tokens, solve_kwargs,
                                          progress)  # fmt: skip
    fit_router(model, oracle_stats(model, batches_of, domains, stats_tokens, progress),
               **solve_kwargs)  # fmt: skip
    return model


def build_dume(zoo, batches_of, stats_tokens, solve_kwargs, stats_mode="oracle", progress=True,
               token_grid=()):  # fmt: skip
    """Upcycle the zoo's experts and fit the routers -> (model, {tokens: oracle stats} or None).

    Oracle mode collects the statistics for `stats_tokens` and every count in `token_grid` in
    one pass (`nested_oracle_stats`); the routers are fitted on those of `stats_tokens`.
    """
    if stats_mode not in STATS_MODES:
        raise ValueError(f"stats_mode must be one of {STATS_MODES}, got {stats_mode!r}")
    model = upcycle([zoo.experts[d] for d in zoo.domains], domains=zoo.domains, progress=False)
    model.eval()
    if stats_mode == "sequential":
        return fit_sequential(
            model, batches_of, zoo.domains, stats_tokens, solve_kwargs, progress
        ), None
    grid = (stats_tokens, *token_grid)
    stats = nested_oracle_stats(model, batches_of, zoo.domains, grid, progress)
    fit_router(model, stats[stats_tokens], **solve_kwargs)
    return model, stats


def set_top_k(model, k):
    for layer in model.dume_layers():
        layer.top_k = k
    model.config.top_k = k
    return model
