"""Plain in-process SFT and the layer ranges of pipeline stages."""

import random

import torch

from fastdume.pipeline.partition import split_layers

from .chat import collate


def stage_layers(num_layers, num_stages, stage):
    """Layer range of a stage, exactly as the pipeline partitions (fastdume.pipeline.partition)."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in 0..{num_stages - 1}, got {stage}")
    return range(*split_layers(num_layers, num_stages)[stage])


def stage_param_names(model, num_stages, stage):
    """Names (as in the HF state dict) of the parameters a stage holds.

    Decoder layers by range; the embeddings go to the first stage, the final norm and the
    head to the last (a tied head is the embedding and is listed under its own name once).
    """
    layers = stage_layers(model.config.num_hidden_layers, num_stages, stage)
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    names = []
    for name, _ in model.named_parameters():
        if name.startswith(prefixes):
            names.append(name)
        elif not name.startswith("model.layers."):
            first = name.startswith("model.embed_tokens.")
            if (first and stage == 0) or (not first and stage == num_stages - 1):
                names.append(name)
    return names


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
    model, encoded, steps, lr, batch_size, pad_id, trainable=None, seed=0, clip=1.0, extra=None
):
    """AdamW SFT for `steps` steps; `trainable`: names to train (others frozen). Returns losses.

    extra: optional callable(model) -> scalar tensor added to every step's loss.
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
    for p in params.values():
        p.requires_grad_(True)
    model.eval()
    return losses
