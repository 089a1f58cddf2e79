"""Detector 2, redundant recomputation: recompute a stage's forward on sampled micro-batches and
compare with the activations it sent (the idea of Lu et al., ICML 2024).

Each stage's hook sends, for sampled (step, micro-batch) pairs, the activations it sent; the
previous stage's copy of the same pair is the checked stage's input. The checked stage also
declares the weights that produced them. A verifier (`verify_recompute`) reruns the stage's layers
on the input with those weights and compares.

Which weights matter, honestly: a weight-only attacker (the attack of 7/9) computes its traffic
honestly from its modified weights, so with the weights the stage *declares* the recomputation
matches and the detector is blind. It only sees such an attacker when the weights are *pinned*
to an audited copy: `pinned=True` keeps a shadow of the stage's parameters that follows only the
replayed optimiser steps (as the update audit does), and declares that shadow instead. It then
catches activation tampering and weight injection alike, but needs the gradients and the replay
the audit already does. Sampling is a shared hash of (seed, step, micro-batch), so neighbouring
stages pick the same pairs without talking.
"""

import random

import torch

from ._base import DetectorHook
from .audit import _group_of, _snapshot_state, replay_step


def sampled(seed, step, micro_batch, rate):
    """Whether (step, micro_batch) is checked: the same answer in every stage process."""
    return random.Random(f"{seed}:{step}:{micro_batch}").random() < rate


class RecomputeSampler(DetectorHook):
    """Sends <name>.act.<mb> for sampled pairs and <name>.w.<param> for their steps."""

    name = "recompute"

    def __init__(self, rate=0.1, seed=0, pinned=False):
        super().__init__()
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        self.rate, self.seed, self.pinned = rate, seed, pinned
        self._shadow = self._state = None
        self._sent_steps = set()
        self.bytes_sent = 0

    def on_activations(self, ctx, micro_batch, tensor):
        t0 = self._tick()
        if sampled(self.seed, ctx.step, micro_batch, self.rate):
            ctx.send(f"{self.name}.act.{micro_batch}", tensor)
            self.bytes_sent += tensor.numel() * tensor.element_size()
            self._sent_steps.add(ctx.step)
        self._tock(t0)

    def before_step(self, ctx, step):
        t0 = self._tick()
        if self.pinned and self._shadow is None:
            # The verifier's copy starts from the audited starting weights.
            self._shadow = {n: p.detach().clone() for n, p in ctx.params.items()}
            self._state = _snapshot_state(ctx.optimizer, ctx.params)
        if step in self._sent_steps:
            weights = self._shadow if self.pinned else ctx.params
            for n, w in weights.items():
                ctx.send(f"{self.name}.w.{n}", w.detach())
                self.bytes_sent += w.numel() * w.element_size()
        table = _group_of(ctx.optimizer)
        self._hyper = {n: dict(table[id(p)]) for n, p in ctx.params.items()}
        self._tock(t0)

    def after_step(self, ctx, step):
        t0 = self._tick()
        if self.pinned:
            opt = ctx.optimizer
            self._shadow, self._state = replay_step(
                type(opt),
                dict(opt.defaults),
                self._hyper,
                self._shadow,
                self._state,
                ctx.grads,
                with_state=True,
            )
        ctx.report(f"{self.name}.bytes", float(self.bytes_sent))
        self.bytes_sent = 0
        self._tock(t0)
        self._flush_time(ctx)


class PinnedRecompute(RecomputeSampler):
    """Recomputation against the audited shadow weights instead of the declared ones."""

    name = "recompute_pinned"

    def __init__(self, rate=0.1, seed=0):
        super().__init__(rate=rate, seed=seed, pinned=True)


def llama_stage_forward(model_config, layer_range):
    """forward(weights, hidden) for decoder layers [a, b) of a Llama-family model (unpadded,
    causal). weights: full-state-dict names -> tensors of those layers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model_config).float().eval()
    a, b = layer_range

    @torch.no_grad()
    def forward(weights, hidden):
        missing = [
            n
            for n, _ in model.named_parameters()
            if n.startswith("model.layers.") and a <= int(n.split(".")[2]) < b and n not in weights
        ]
        if missing:
            raise ValueError(
                f"weights must hold every parameter of layers {a}..{b - 1}, missing {missing[:3]}"
            )
        model.load_state_dict({n: w for n, w in weights.items()}, strict=False)
        pos = torch.arange(hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
        emb = model.model.rotary_emb(hidden, pos)
        h = hidden
        for layer in model.model.layers[a:b]:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=emb)
            h = h[0] if isinstance(h, tuple) else h
        return h

    return forward


def verify_recompute(messages, stage, forward, replica=0, tol=1e-4, prefix="recompute"):
    """Recompute `stage` on every sampled pair; {"checked", "first_step", "max_rel_err"}.

    messages: {(stage, replica): [(step, tag, tensor), ...]} as returned by a run. A pair is
    flagged when ||sent - recomputed|| / ||recomputed|| > tol.
    """

    def acts(s):
        return {
            (st, int(tag.rsplit(".", 1)[1])): t
            for st, tag, t in messages.get((s, replica), [])
            if tag.startswith(f"{prefix}.act.")
        }

    inputs, outputs = acts(stage - 1), acts(stage)
    weights = {}
    for st, tag, t in messages.get((stage, replica), []):
        if tag.startswith(f"{prefix}.w."):
            weights.setdefault(st, {})[tag[len(prefix) + 3 :]] = t
    checked, first, worst = 0, None, 0.0
    for key in sorted(set(inputs) & set(outputs)):
        step = key[0]
        if step not in weights:
            continue
        ref = forward(weights[step], inputs[key])
        err = float(
            torch.linalg.vector_norm(outputs[key] - ref) / (torch.linalg.vector_norm(ref) + 1e-30)
        )
        checked += 1
        worst = max(worst, err)
        if err > tol and first is None:
            first = step
    return {"checked": checked, "first_step": first, "max_rel_err": worst}
