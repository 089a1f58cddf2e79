"""The small causal-LM training loop the zoo uses (fp32, CPU or GPU, deterministic per seed)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from fastdume.data.batching import batches, token_nll


def stream(tokenizer, domain: str, seq_len: int, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless training batches of one domain: a fresh shuffle (seed, epoch) every epoch."""
    for epoch in itertools.count():
        yield from batches(
            tokenizer, domain, "train", seq_len, batch_size, seed=seed * 100_003 + epoch
        )


def mixed_stream(tokenizer, domains: list[str], seq_len: int, batch_size: int, seed: int):
    """Round-robin over the domains' streams: every domain gets the same number of steps."""
    streams = [stream(tokenizer, d, seq_len, batch_size, seed + i) for i, d in enumerate(domains)]
    for s in itertools.cycle(streams):
        yield next(s)


def _lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    # Linear warm-up, then cosine decay to `floor` of the peak.
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: torch.nn.Module,
    data: Iterator[dict],
    steps: int,
    lr: float,
    warmup: int = 0,
    weight_decay: float = 0.0,
    desc: str = "train",
) -> list[float]:
    """AdamW on next-token loss (padding excluded) for `steps` batches; returns the losses."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, foreach=True
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    losses = []
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, mininterval=2.0)
    for _ in bar:
        nll, count = token_nll(model, next(data))
        loss = nll / max(count, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses
