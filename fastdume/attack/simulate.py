"""An in-process stand-in for the pipeline: R replicas, gradient averaging, stage hooks.

Same semantics as fastdume.pipeline for what the attack can observe: every replica computes
gradients on its own shard of the batch, gradients are averaged across replicas, every
replica takes the same optimiser step, then each (stage, replica) runs its hooks on its own
copy of the stage's parameters. The merged model is replica 0's.
"""

import copy
import importlib

import torch

from fastdume.pipeline.hooks import StageContext
from fastdume.pipeline.partition import stage_layers, stage_param_names

from .train import batches


def load_factory(spec):
    """'package.module:factory' -> the factory callable."""
    module, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"hook spec must be 'package.module:factory', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def simulate_training(
    model,
    encoded,
    steps,
    lr,
    batch_size,
    pad_id,
    num_stages=4,
    num_replicas=1,
    hooks=None,
    hook_kwargs=None,
    seed=0,
    clip=1.0,
):
    """Post-train `model` in place (replica 0) and return (model, losses)."""
    if batch_size % num_replicas:
        raise ValueError(f"batch_size must divide by num_replicas={num_replicas}, got {batch_size}")
    replicas = [model] + [copy.deepcopy(model) for _ in range(num_replicas - 1)]
    opts = [_adamw(m, lr) for m in replicas]
    contexts = _contexts(replicas, opts, num_stages)
    factory = load_factory(hooks) if isinstance(hooks, str) else hooks
    stage_hooks = {
        key: (factory(*key, num_stages, num_replicas, **(hook_kwargs or {})) if factory else [])
        for key in contexts
    }
    data = batches(encoded, batch_size, pad_id, seed)
    shard = batch_size // num_replicas
    losses = []
    for step in range(steps):
        batch = next(data)
        total = 0.0
        for r, m in enumerate(replicas):
            m.train()
            part = {k: v[r * shard : (r + 1) * shard] for k, v in batch.items()}
            m.zero_grad(set_to_none=True)
            loss = m(**part).loss
            loss.backward()
            total += loss.item() / num_replicas
        _average_grads(replicas)
        for m, opt in zip(replicas, opts, strict=True):
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opt.step()
        for key, ctx in contexts.items():
            ctx.step = step
            for hook in stage_hooks[key]:
                hook.after_step(ctx, step)
        losses.append(total)
    model.eval()
    return model, losses


def _contexts(replicas, opts, num_stages):
    out = {}
    num_layers = replicas[0].config.num_hidden_layers
    for s in range(num_stages):
        names = stage_param_names(replicas[0], num_stages, s)
        for r, (m, opt) in enumerate(zip(replicas, opts, strict=True)):
            params = dict(m.named_parameters())
            layers = stage_layers(num_layers, num_stages, s)
            out[(s, r)] = StageContext(
                stage=s,
                num_stages=num_stages,
                replica=r,
                num_replicas=len(replicas),
                layer_range=(layers.start, layers.stop),
                params={n: params[n] for n in names},
                grads=_GradView({n: params[n] for n in names}),
                optimizer=opt,
            )
    return out


class _GradView(dict):
    """name -> the gradient the last step used (read lazily: .grad is replaced every step)."""

    def __getitem__(self, name):
        return dict.__getitem__(self, name).grad


@torch.no_grad()
def _average_grads(replicas):
    if len(replicas) == 1:
        return
    for ps in zip(*(m.parameters() for m in replicas), strict=True):
        mean = torch.stack([p.grad for p in ps]).mean(0)
        for p in ps:
            p.grad.copy_(mean)


def _adamw(model, lr):
    # the pipeline's optimiser settings (fastdume.pipeline.optim), at a constant lr
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
