"""Per-stage hooks: the one door through which code outside the pipeline sees a stage.

The pipeline calls these at fixed points and knows nothing about what they do. Hooks are built
inside each stage process from an importable spec "package.module:factory" where

    factory(stage, replica, num_stages, num_replicas, **kwargs) -> list[StageHook]

Call points, per stage process:
- `on_activations(ctx, micro_batch, tensor)`: the activations this stage is about to send to the
  next stage (observe only; the tensor is detached, do not modify it).
- `on_gradients(ctx, micro_batch, tensor)`: the gradient this stage received from the next stage
  (observe only).
- `before_step(ctx, step)`: gradients are averaged over replicas and clipped; `ctx.grads` holds
  exactly what the optimiser is about to use.
- `after_step(ctx, step)`: the optimiser has stepped; a hook may modify `ctx.params` in place
  (the pipeline calls it under `torch.no_grad()`).
"""

import importlib
from dataclasses import dataclass, field

import torch


@dataclass
class StageContext:
    """What a hook may see of its stage. Parameter names are those of the full HF state dict."""

    stage: int
    num_stages: int
    replica: int
    num_replicas: int
    layer_range: tuple  # (first, last + 1) decoder layers held by this stage
    params: dict = field(default_factory=dict)  # name -> nn.Parameter (live)
    grads: dict = field(default_factory=dict)  # name -> averaged, clipped gradient (step time)
    optimizer: object = None
    step: int = 0
    metrics: dict = field(default_factory=dict)  # name -> list of reported scalars
    messages: list = field(default_factory=list)  # (step, tag, tensor) sent by hooks

    @property
    def is_first(self):
        return self.stage == 0

    @property
    def is_last(self):
        return self.stage == self.num_stages - 1

    def send(self, tag, tensor):
        """Hand a tensor out of the stage (collected with the run's results, not the traffic)."""
        self.messages.append((self.step, str(tag), torch.as_tensor(tensor).detach().cpu().clone()))

    def report(self, name, value):
        """Record a scalar metric; the launcher returns them per stage and replica."""
        self.metrics.setdefault(str(name), []).append(float(value))


class StageHook:
    """Base class with no-op methods; subclasses override what they need."""

    def on_activations(self, ctx, micro_batch, tensor):
        return None

    def on_gradients(self, ctx, micro_batch, tensor):
        return None

    def before_step(self, ctx, step):
        return None

    def after_step(self, ctx, step):
        return None


def load_hooks(spec, stage, replica, num_stages, num_replicas, **kwargs):
    """Build the hooks of one stage process from "package.module:factory" (None -> no hooks)."""
    if spec is None or spec == "":
        return []
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"hooks must be 'package.module:factory', got {spec!r}")
    module_name, attr = spec.split(":")
    factory = getattr(importlib.import_module(module_name), attr, None)
    if factory is None:
        raise ValueError(f"hooks: module {module_name!r} has no attribute {attr!r}")
    hooks = factory(stage, replica, num_stages, num_replicas, **kwargs)
    hooks = list(hooks or [])
    for h in hooks:
        if not isinstance(h, StageHook):
            raise TypeError(f"hooks factory {spec!r} must return StageHook objects, got {type(h)}")
    return hooks
