"""Tiny dense 'domain experts' on disk and per-domain token batches, for router/dynamic tests."""

import torch
from tiny_models import tiny_dense

DOMAINS = ("a", "b", "c")


def make_experts(root, shared_noise=0.0, family="llama", count=3, **overrides):
    """A base model and `count` experts derived from it: each MLP strongly changed, every other
    tensor changed by `shared_noise` (0: experts share the base's non-MLP weights exactly)."""
    base = tiny_dense(family, seed=0, **overrides)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    dirs = {}
    for i, domain in enumerate(DOMAINS[:count]):
        expert = tiny_dense(family, seed=0, **overrides)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in expert.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                p.add_(noise * (0.05 if ".mlp." in name else shared_noise))
        dirs[domain] = root / domain
        expert.save_pretrained(dirs[domain])
    return base_dir, dirs


def domain_batches(domain, count=3, batch=2, seq=12, seed=0, pad=True):
    """Token batches whose ids come from a domain-specific range (so routing is learnable), with
    right padding on the last row."""
    g = torch.Generator().manual_seed(seed * 31 + DOMAINS.index(domain))
    lo = 40 * DOMAINS.index(domain)
    out = []
    for _ in range(count):
        ids = torch.randint(lo, lo + 60, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad:
            mask[-1, seq // 2 :] = 0
            ids[-1, seq // 2 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out
