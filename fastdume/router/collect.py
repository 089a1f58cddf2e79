"""Collecting router statistics: run a model with every layer forced to one domain's expert and
accumulate every router's input features in one forward pass, stopped after the last router
(sharded over ranks when torch.distributed is up). The vocabulary router's statistics are the
domain's token counts: no forward at all."""

import contextlib
import math
from collections.abc import Mapping

import torch

from fastdume.models.modeling import forced_expert
from fastdume.router.fingerprint import (
    check_model,
    model_options,
    router_shape,
    shared_fingerprint,
)
from fastdume.router.stats import RouterStats


class _StopForward(Exception):
    """Raised after the last MoE input is captured: the rest of the forward is not needed."""


def _as_batch(batch, device):
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"a batch dict needs 'input_ids', got keys {sorted(batch)}")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    elif isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    else:
        raise TypeError(f"batches must yield dicts or tensors, got {type(batch).__name__}")
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(ids.shape)}")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
    return ids.to(device), mask.to(device)


def _token_mask(mask, skip_first_token, budget):
    keep = mask.bool()
    if skip_first_token:
        first = (keep.long().cumsum(dim=1) == 1) & keep
        keep = keep & ~first
    if budget is not None:
        # Keep the first `budget` kept tokens in row-major order.
        keep = keep & (keep.reshape(-1).long().cumsum(0) <= budget).reshape(keep.shape)
    return keep


def _rank_budget(max_tokens):
    if max_tokens is None:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return math.ceil(max_tokens / dist.get_world_size())
    return max_tokens


def _is_main_rank():
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def _capturing(model, update):
    """Call update(index, router input [B, S, H]) for every router of a forward; the paper's
    configuration through pre-hooks on the MoE layers, the others through the RoutingState's
    recorder (which sees the router features: running means, the token table, ...)."""
    state = model.dume_state
    if state is None:
        handles = [
            layer.register_forward_pre_hook(lambda module, args, i=i: update(i, args[0]))
            for i, layer in enumerate(model.dume_layers())
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        return
    previous = state.recorder
    state.recorder = lambda index, features, mask: update(index, features)
    try:
        yield
    finally:
        state.recorder = previous


def _collect_local(model, domain, batches, budget, skip_first_token, local, progress):
    device = next(model.parameters()).device
    if local.has_gram:
        step, scope = _forward_step(model, domain, local)
    else:  # the vocabulary router: its statistics are token counts, no forward is needed

        def step(ids, mask, keep):
            local.update_tokens(ids, domain, keep)

        scope = contextlib.nullcontext()
    bar = _progress(progress, budget, domain)
    seen = 0
    try:
        with torch.no_grad(), scope:
            for batch in batches:
                ids, mask = _as_batch(batch, device)
                keep = _token_mask(mask, skip_first_token, _left(budget, seen))
                added = int(keep.sum())
                if added:
                    step(ids, mask, keep)
                    seen += added
                    bar.update(added)
                if budget is not None and seen >= budget:
                    break
    finally:
        bar.close()
    return seen


def _forward_step(model, domain, local):
    """(step(ids, mask, keep), context): run the model forced to `domain`'s expert and add every
    router's features at the kept tokens, stopping the forward after the last router."""
    expert = list(model.config.domains).index(domain)
    last = local.num_layers - 1
    state = {"keep": None}

    def update(index, x):
        local.update(index, x.reshape(state["keep"].shape + (-1,)), domain, state["keep"])
        if index == last:
            raise _StopForward  # the rest of the forward is not needed

    def step(ids, mask, keep):
        state["keep"] = keep
        with contextlib.suppress(_StopForward):
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    @contextlib.contextmanager
    def scope():
        with forced_expert(model, expert), _capturing(model, update):
            yield

    return step, scope()


def _left(budget, seen):
    return None if budget is None else budget - seen


def _progress(progress, total, domain):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=f"stats {domain}",
        disable=not (progress and _is_main_rank()),
    )


def collect_stats(
    model, domain, batches, max_tokens=None, skip_first_token=False, stats=None, progress=True
):
    """Statistics of one domain's data, with every layer forced to that domain's expert.

    batches: iterable of dicts with "input_ids" [B, S] and optional "attention_mask" [B, S]
    (padding excluded), or of input_ids tensors. All layers are captured in one forward pass.
    max_tokens: bound on the tokens used (across ranks under torch.distributed).
    stats: an existing RouterStats of this model to extend in place (more tokens or a new
    domain); otherwise a new one holding just `domain` is returned.
    Under torch.distributed each rank passes its own shard and the result is summed over ranks.
    """
    domains = list(model.config.domains)
    if domain not in domains:
        raise ValueError(f"domain must be one of the model's domains {domains}, got {domain!r}")
    budget = _rank_budget(max_tokens)
    num_layers, hidden = router_shape(model)
    fingerprint = shared_fingerprint(model)
    if stats is not None:
        check_model(stats, model)
    device = next(model.parameters()).device
    options = model_options(model)
    local = RouterStats(num_layers, hidden, [domain], fingerprint, device, options)
    was_training = model.training
    model.eval()
    try:
        _collect_local(model, domain, batches, budget, skip_first_token, local, progress)
    finally:
        model.train(was_training)
    local.all_reduce()
    if local.tokens(domain) == 0:
        raise ValueError(f"no tokens collected for domain {domain!r}: batches are empty or masked")
    if stats is None:
        return local
    stats += local
    stats.fingerprint = fingerprint
    return stats
