"""Per-domain perplexity, routing accuracy per layer, tokens/s, and retention."""

import contextlib
import math
import time

import torch

from fastdume.data import token_nll
from fastdume.ops.moe import route


def evaluate(model, batches_of, domains, split="test", routing=False):
    """-> {"ppl": {domain: ppl}, "routing": {domain: [acc per layer]} | None, "tokens_per_s"}.

    routing=True (DUME models only): share of each domain's tokens whose top-1 expert is the
    domain's own, per router (per layer, except depth="single": one). tokens_per_s counts
    unpadded tokens over forward time.
    """
    model.eval()
    ppl, acc = {}, {} if routing else None
    tokens, seconds = 0, 0.0
    for e, d in enumerate(domains):
        total, count = 0.0, 0
        counts = [[0, 0] for _ in range(num_routers(model))] if routing else None
        with torch.no_grad(), routing_recorder(model, counts) as state:
            for batch in batches_of(d, split):
                if state is not None:
                    state["mask"], state["expert"] = batch["attention_mask"].bool(), e
                start = time.perf_counter()
                nll, n = token_nll(model, batch)
                seconds += time.perf_counter() - start
                tokens += int(batch["attention_mask"].sum())
                total, count = total + float(nll), count + n
        if count == 0:
            raise ValueError(f"the {split!r} batches of domain {d!r} hold no target tokens")
        ppl[d] = math.exp(total / count)
        if routing:
            acc[d] = [hit / max(n, 1) for hit, n in counts]
    return {"ppl": ppl, "routing": acc, "tokens_per_s": tokens / max(seconds, 1e-9)}


def num_routers(model):
    """How many routing decisions a forward makes (one per router; the paper: one per layer)."""
    routers = getattr(model, "dume_routers", None)
    return len(routers()) if routers is not None else len(model.dume_layers())


@contextlib.contextmanager
def decision_hook(model, callback):
    """Call callback(router index, top-1 expert ids [B, S]) for every routing decision.

    Models with the paper's options route inside each DumeMoE (a pre-hook recomputes the
    decision from the router, as `fused_moe` does); the other options decide through the
    model's RoutingState, whose `on_decision` hook is chained for the duration of the block.
    """
    state = getattr(model, "dume_state", None)
    if state is not None:
        previous = state.on_decision

        def chained(index, ids):
            if previous is not None:
                previous(index, ids)
            callback(index, ids)

        state.on_decision = chained
        try:
            yield
        finally:
            state.on_decision = previous
        return

    def make_hook(index):
        def hook(module, args):
            x = args[0]
            if module.force_expert is not None:
                ids = torch.full(x.shape[:-1], module.force_expert, dtype=torch.long)
            else:
                flat, r = x.reshape(-1, x.shape[-1]), module.router
                _, top = route(flat, r.weight, r.bias, 1, module.temperature)
                ids = top[:, 0].reshape(x.shape[:-1])
            callback(index, ids)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(model.dume_layers())]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def routing_recorder(model, counts):
    """Count, per router, tokens whose top-1 expert is the expected one (padding excluded).

    counts: [[hits, tokens] per router (`num_routers`)], updated in place; None records
    nothing. Set the yielded state's "mask" ([B, S] bool) and "expert" before each forward.
    """
    if counts is None:
        yield None
        return
    state = {"mask": None, "expert": None}

    def record(index, ids):
        keep = state["mask"].to(ids.device)
        counts[index][0] += int((ids[keep] == state["expert"]).sum())
        counts[index][1] += int(keep.sum())

    with decision_hook(model, record):
        yield state


def retention(dense_own, ppl):
    """dense expert's ppl on its own domain / method's ppl: per domain, mean and worst."""
    per = {d: dense_own[d] / ppl[d] for d in dense_own}
    return {"per_domain": per, "mean": sum(per.values()) / len(per), "worst": min(per.values())}


def mean_nll(ppl):
    """Mean over domains of log-perplexity: the selection score for tuned baselines."""
    return sum(math.log(p) for p in ppl.values()) / len(ppl)
