"""Decentralised pipeline-parallel post-training: stages in separate processes over
torch.distributed, activations and gradients streamed as checked messages of fastdume.ops.wire.

    from fastdume.pipeline import PipelineConfig, train
    summary = train(PipelineConfig(model="base/", data="sft.jsonl", out="run/", stages=4,
                                    replicas=2, micro_batches=8, steps=100, compress="int8"))
    summary["losses"], summary["model_dir"]

The command line face is `fastdume pipeline-train` (fastdume/commands/pipeline_train.py, which
also documents the torchrun form for several machines). Hooks: fastdume.pipeline.hooks.
"""

from fastdume.pipeline.hooks import StageContext, StageHook, load_hooks

# `train` is fastdume.pipeline.launch.launch (the submodule name would shadow the function)
_LAZY = {
    "train": "fastdume.pipeline.launch",
    "PipelineError": "fastdume.pipeline.launch",
    "PipelineConfig": "fastdume.pipeline.runtime",
    "PeerError": "fastdume.pipeline.transport",
}

__all__ = ["StageContext", "StageHook", "load_hooks", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        attr = "launch" if name == "train" else name
        return getattr(importlib.import_module(_LAZY[name]), attr)
    raise AttributeError(f"module 'fastdume.pipeline' has no attribute {name!r}")
