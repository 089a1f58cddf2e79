"""AdamW with linear warmup then cosine decay, and global gradient-norm clipping."""

import math

import torch


def lr_lambda(warmup, total, min_ratio=0.1):
    """Multiplier of the base lr at step s (0-based): linear warmup, then cosine to min_ratio."""

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        t = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def make_optimizer(params, lr, weight_decay, warmup, total, min_ratio=0.1):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total, min_ratio))
    return opt, sched


def clip_coefficient(total_norm, max_norm):
    """The factor torch.nn.utils.clip_grad_norm_ applies for a given global norm."""
    if max_norm is None or max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))
