"""Decentralised pipeline-parallel post-training: stages in separate processes over
torch.distributed, activations streamed through fastdume.ops.stream."""

from fastdume.pipeline.hooks import StageContext, StageHook, load_hooks

__all__ = ["StageContext", "StageHook", "load_hooks"]
