"""Hooks used by the pipeline's own tests (importable by name inside stage processes)."""

import os
import signal

from fastdume.pipeline.hooks import StageHook


class RecordingHook(StageHook):
    """Reports what it was shown, through ctx.report, so the test can check it."""

    def on_activations(self, ctx, micro_batch, tensor):
        ctx.report("activations", micro_batch)
        ctx.report("act_numel", tensor.numel())

    def on_gradients(self, ctx, micro_batch, tensor):
        ctx.report("gradients", micro_batch)

    def before_step(self, ctx, step):
        ctx.report("before_step", step)
        same = set(ctx.grads) == set(ctx.params)
        ctx.report("grads_cover_params", float(same))
        ctx.report("grad_sq", sum(float(g.double().pow(2).sum()) for g in ctx.grads.values()))
        if step == 0:
            names = sorted(ctx.params)
            ctx.report("num_params", len(names))
            ctx.send("first_param_" + names[0], ctx.params[names[0]])

    def after_step(self, ctx, step):
        ctx.report("after_step", step)


def recording(stage, replica, num_stages, num_replicas, **kwargs):
    return [RecordingHook()]


class KillHook(StageHook):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_activations(self, ctx, micro_batch, tensor):
        if ctx.step == self.at_step and micro_batch == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_stage(stage, replica, num_stages, num_replicas, victim=1, at_step=1):
    return [KillHook(at_step)] if stage == victim else []


class HangHook(StageHook):
    def on_activations(self, ctx, micro_batch, tensor):
        if ctx.step == 1:
            import time

            time.sleep(10**6)


def hang_stage(stage, replica, num_stages, num_replicas, victim=1):
    return [HangHook()] if stage == victim else []
