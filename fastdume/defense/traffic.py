"""Detector 4, traffic statistics (the SENTINEL idea): running-average z-scores of what a stage
sends (activations) and receives (gradients).

Per micro-batch the hook takes a few cheap features: the log RMS of the tensor and the per-channel
mean over tokens. Each is compared with an exponential running mean and variance built from the
previous traffic of the same stage; the score of a micro-batch is the largest of |z(log RMS)| and
the RMS over channels of the channel-mean z. The step's score is the maximum over its
micro-batches. Statistics are updated after scoring, so an anomaly is judged against the past.
Cost: O(tokens x hidden) per micro-batch, no extra traffic. A weight-only attacker changes what
its stage sends only as much as its weights change its function, so this detector sees large
injections and is blind to small ones (measured in the report).
"""

import math

import torch

from ._base import DetectorHook


class _Running:
    """Exponential running mean and variance of a feature vector."""

    def __init__(self, alpha, warmup):
        self.alpha, self.warmup, self.n = alpha, warmup, 0
        self.mean = self.var = None

    def score(self, x):
        if self.n < self.warmup:
            return 0.0
        return (x - self.mean) / torch.sqrt(self.var + 1e-8)

    def update(self, x):
        self.n += 1
        if self.mean is None:
            self.mean, self.var = x.clone(), torch.zeros_like(x)
            return
        a = 1.0 / self.n if self.n <= self.warmup else self.alpha
        d = x - self.mean
        self.mean = self.mean + a * d
        self.var = (1 - a) * (self.var + a * d * d)


def _features(t):
    t = t.detach().float().reshape(-1, t.shape[-1])
    rms = torch.sqrt((t * t).mean() + 1e-12)
    return torch.log(rms).reshape(1), t.mean(0) / rms


class TrafficStats(DetectorHook):
    """Reports traffic.act_z and traffic.grad_z (max over the step's micro-batches)."""

    name = "traffic"

    def __init__(self, alpha=0.05, warmup=20):
        super().__init__()
        self._run = {k: (_Running(alpha, warmup), _Running(alpha, warmup)) for k in ("act", "grad")}
        self._step_max = {"act": 0.0, "grad": 0.0}
        self._pending = {"act": [], "grad": []}

    def _observe(self, kind, tensor):
        t0 = self._tick()
        scalar, channels = _features(tensor)
        rs, rc = self._run[kind]
        zs, zc = rs.score(scalar), rc.score(channels)
        score = 0.0
        if torch.is_tensor(zs):
            score = max(float(zs.abs().max()), float(torch.sqrt((zc * zc).mean())))
        self._step_max[kind] = max(self._step_max[kind], score)
        self._pending[kind].append((scalar, channels))
        self._tock(t0)

    def on_activations(self, ctx, micro_batch, tensor):
        self._observe("act", tensor)

    def on_gradients(self, ctx, micro_batch, tensor):
        self._observe("grad", tensor)

    def after_step(self, ctx, step):
        t0 = self._tick()
        for kind in ("act", "grad"):
            rs, rc = self._run[kind]
            for scalar, channels in self._pending[kind]:
                rs.update(scalar)
                rc.update(channels)
            self._pending[kind] = []
            v = self._step_max[kind]
            ctx.report(f"traffic.{kind}_z", v if math.isfinite(v) else 1e9)
            self._step_max[kind] = 0.0
        self._tock(t0)
        self._flush_time(ctx)
