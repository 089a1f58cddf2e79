"""Detector 1, update audit: replay the stage's optimiser step and compare with its parameters.

In `before_step` the verifier holds the stage's parameters and optimiser state as they were after
the previous verified step; `ctx.grads` is exactly what the optimiser is about to use. In
`after_step` it applies the same optimiser class, hyperparameters and state to a private copy and
compares the result with the parameters the stage now reports. Under deterministic arithmetic
(same device, same optimiser implementation) the replay is bitwise equal, so the default tolerance
is zero: any weight change that the training step does not explain is flagged at the step it is
made. Place this hook after any hook that may modify parameters in `after_step` (the stage's
report is what it holds after all its own code ran); a change made later, or between steps, is
caught by the continuity check at the next `before_step`.

What it trusts: the gradients the stage declares. A stage that lies about its gradients needs
recomputation (detector 2) on top.
"""

import inspect

import torch

from ._base import DetectorHook


def _snapshot_state(opt, params):
    """Deep copy of the optimiser state of the given parameters (tensors cloned)."""
    out = {}
    for name, p in params.items():
        st = opt.state.get(p, {}) if opt is not None else {}
        out[name] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    return out


def _group_of(opt):
    """Map id(param) -> hyperparameters of its optimiser group (everything but 'params')."""
    table = {}
    for group in opt.param_groups:
        hp = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            table[id(p)] = hp
    return table


@torch.no_grad()
def replay_step(optimizer_cls, defaults, hyper, before, state, grads, with_state=False):
    """Parameters after one step of optimizer_cls from `before` with `grads`, on private copies.

    hyper: name -> group hyperparameters; state: name -> optimiser state; names with no gradient
    are skipped by the optimiser exactly as in the stage. with_state=True also returns the
    optimiser state after the step (name -> dict).
    """
    clones = {n: before[n].clone().requires_grad_(True) for n in before}
    groups = {}
    for n in sorted(clones):
        key = tuple(sorted((k, repr(v)) for k, v in hyper[n].items()))
        groups.setdefault(key, (hyper[n], []))[1].append(n)
    # Some defaults are not constructor arguments (AdamW's decoupled_weight_decay): drop them,
    # the groups carry every hyperparameter anyway.
    accepted = inspect.signature(optimizer_cls).parameters
    defaults = {k: v for k, v in defaults.items() if k in accepted}
    opt = optimizer_cls(
        [{"params": [clones[n] for n in ns], **hp} for hp, ns in groups.values()], **defaults
    )
    for n, p in clones.items():
        opt.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state[n].items()}
        g = grads.get(n)
        p.grad = None if g is None else g.detach().clone()
    with torch.enable_grad():
        opt.step()
    params = {n: p.detach() for n, p in clones.items()}
    if with_state:
        return params, {n: dict(opt.state.get(p, {})) for n, p in clones.items()}
    return params


def max_deviation(actual, expected, rtol=0.0):
    """Largest |actual - expected| - rtol * |expected| over all parameters (<= 0 means within)."""
    dev = 0.0
    for n, e in expected.items():
        a = actual[n].detach()
        d = (a.to(e.dtype) - e).abs() - rtol * e.abs()
        dev = max(dev, float(d.max())) if d.numel() else dev
    return dev


class UpdateAudit(DetectorHook):
    """Replays every optimiser step of its stage; reports audit.dev and audit.flag per step."""

    name = "audit"

    def __init__(self, atol=0.0, rtol=0.0):
        super().__init__()
        if atol < 0 or rtol < 0:
            raise ValueError(f"atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
        self.atol, self.rtol = float(atol), float(rtol)
        self._before = None  # name -> params after the last verified step
        self._state = None
        self._continuity = 0.0

    def _snapshot(self, ctx):
        self._before = {n: p.detach().clone() for n, p in ctx.params.items()}
        self._state = _snapshot_state(ctx.optimizer, ctx.params)

    def before_step(self, ctx, step):
        t0 = self._tick()
        if self._before is None:
            self._snapshot(ctx)
            self._continuity = 0.0
        else:
            # Anything that moved the weights since the last verified step is unexplained.
            self._continuity = max_deviation(ctx.params, self._before, self.rtol)
            if self._continuity > self.atol:
                self._before = {n: p.detach().clone() for n, p in ctx.params.items()}
        table = _group_of(ctx.optimizer)
        self._hyper = {n: dict(table[id(p)]) for n, p in ctx.params.items()}
        self._tock(t0)

    def after_step(self, ctx, step):
        t0 = self._tick()
        opt = ctx.optimizer
        expected = replay_step(
            type(opt), dict(opt.defaults), self._hyper, self._before, self._state, ctx.grads
        )
        dev = max(max_deviation(ctx.params, expected, self.rtol), self._continuity)
        ctx.report("audit.dev", dev)
        ctx.report("audit.flag", float(dev > self.atol))
        self._snapshot(ctx)
        self._tock(t0)
        self._flush_time(ctx)
