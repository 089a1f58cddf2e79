"""Plain in-process SFT."""

import random

import torch

from .chat import collate


def batches(encoded, batch_size, pad_id, seed=0):
    """Endless shuffled batches over a list of (input_ids, labels)."""
    if not encoded:
        raise ValueError("encoded must be a non-empty list of (input_ids, labels), got none")
    rng = random.Random(seed)
    order = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        take, order = order[:batch_size], order[batch_size:]
        yield collate([encoded[i] for i in take], pad_id)


def sft(
    model,
    encoded,
    steps,
    lr,
    batch_size,
    pad_id,
    trainable=None,
    seed=0,
    clip=1.0,
    extra=None,
    after=None,
):
    """AdamW SFT for `steps` steps; `trainable`: names to train (others frozen). Returns losses.

    extra: optional callable(model) -> scalar tensor added to every step's loss. after: optional
    callable(model, steps_done) called after every step (measurements part way: a run of n steps
    measured at step k is the run of k steps, since the learning rate is constant).
    """
    params = dict(model.named_parameters())
    names = list(params) if trainable is None else list(trainable)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"trainable must name parameters of the model, unknown: {unknown[:3]}")
    for n, p in params.items():
        p.requires_grad_(n in set(names))
    opt = torch.optim.AdamW([params[n] for n in names], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    data = batches(encoded, batch_size, pad_id, seed)
    for _ in range(steps):
        loss = model(**next(data)).loss
        if extra is not None:
            loss = loss + extra(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([params[n] for n in names], clip)
        opt.step()
        losses.append(loss.item())
        if after is not None:
            after(model, len(losses))
            model.train()
    for p in params.values():
        p.requires_grad_(True)
    model.eval()
    return losses
