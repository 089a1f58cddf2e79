"""DUME+ (router-only fine-tuning), BTX-style router training, and full fine-tuning.

With k = 1 the routing weight is a softmax over one score, i.e. the constant 1, so the LM loss
gives the router no gradient. `router_weighting` swaps the MoE forward during training for one
of these weightings of the k selected experts (logits = (x W^T + b) / T as at inference):

- "topk": softmax over the k selected logits (the model's own; no router gradient when k = 1);
- "switch": each selected expert's output times its probability under the softmax over *all*
  experts (Switch Transformer), so the forward differs from inference by that factor;
- "st": straight-through: the forward uses the inference weights exactly, the backward that of
  the full-softmax probability (p / p.detach() has the value 1 and the gradient of p).
"""

import contextlib
import itertools
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastdume.ops.moe import moe_experts

WEIGHTINGS = ("topk", "switch", "st")


def _weights(logits, top_k, weighting):
    scores, ids = torch.topk(logits, top_k, dim=-1)
    own = torch.softmax(scores, dim=-1)
    if weighting == "topk":
        return own, ids
    full = torch.softmax(logits, dim=-1).gather(1, ids)
    if weighting == "switch":
        return full, ids
    return own * full / full.detach(), ids


def _forward(layer, weighting):
    def forward(hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = F.linear(x.float(), layer.router.weight, layer.router.bias) / layer.temperature
        weights, ids = _weights(logits, layer.top_k, weighting)
        gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
        return moe_experts(x, weights, ids, gate_up, down, check_ids=False).reshape(shape)

    return forward


@contextlib.contextmanager
def router_weighting(model, weighting):
    """Inside the block every DumeMoE routes with `weighting` (see the module docstring)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    layers = model.dume_layers()
    for layer in layers:
        layer.forward = _forward(layer, weighting)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


def router_parameters(model):
    """The router weight and bias of every layer (nothing else: not the experts' gates)."""
    return [p for layer in model.dume_layers() for p in layer.router.parameters()]


def _mixed(batches_of, domains):
    """Round-robin over the domains' training batches, forever (each domain restarts)."""
    streams = [itertools.cycle(list(batches_of(d, "train"))) for d in domains]
    for stream in itertools.cycle(streams):
        yield next(stream)


def _loss(model, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    keep = (mask[:, 1:] * mask[:, :-1]).bool().reshape(-1)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    return (nll * keep).sum() / keep.sum().clamp(min=1)


def train_model(
    model,
    batches_of,
    domains,
    steps,
    lr,
    which="router",
    weighting="switch",
    progress=True,
    desc="train",
    score=None,
    checkpoints=0,
):
    """AdamW with cosine decay on a round-robin mix of the domains' training data.

    which="router": only router weights and biases train (every other parameter is frozen);
    which="all": every parameter. Returns (per-step training losses, selection) where, with a
    `score(model) -> float` (lower is better, e.g. validation NLL) and `checkpoints` > 0, the
    model is scored before training and at that many evenly spaced steps, and the best scoring
    weights are kept; selection = {"step": chosen step, "scores": {step: score}} (else None).
    """
    if which not in ("router", "all"):
        raise ValueError(f"which must be 'router' or 'all', got {which!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    params = router_parameters(model) if which == "router" else list(model.parameters())
    chosen = {id(p) for p in params}
    before = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    losses, data = [], _mixed(batches_of, domains)
    marks = {round(steps * (i + 1) / checkpoints) for i in range(checkpoints)} if score else set()
    best = _Best(model, params, score, 0) if marks else None
    try:
        with router_weighting(model, weighting):
            for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress):
                model.train()
                loss = _loss(model, next(data))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if step in marks:
                    best.offer(step)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(before[id(p)])
    return losses, (best.restore() if best else None)


class _Best:
    """Keeps a copy of the trained parameters at the best score seen."""

    def __init__(self, model, params, score, step):
        self.model, self.params, self.score, self.scores = model, params, score, {}
        self.offer(step)

    def offer(self, step):
        self.model.eval()
        with torch.no_grad():
            value = float(self.score(self.model))
        self.scores[step] = value
        if value <= min(self.scores.values()):
            self.step, self.saved = step, [p.detach().clone() for p in self.params]

    def restore(self):
        with torch.no_grad():
            for p, saved in zip(self.params, self.saved, strict=True):
                p.copy_(saved)
        return {"step": self.step, "scores": self.scores}
