"""The process-group backend: NCCL only where every rank on the host has a GPU of its own."""

import pytest
import torch

from fastdume._dist import process_group_backend


@pytest.mark.parametrize(
    "gpus, world, local, expected",
    [
        (0, 2, None, "gloo"),  # no GPU at all (CUDA tensors impossible, but never NCCL)
        (1, 2, None, "gloo"),  # two ranks on one GPU: NCCL would refuse them
        (2, 2, None, "cpu:gloo,cuda:nccl"),
        (8, 16, "8", "cpu:gloo,cuda:nccl"),  # torchrun on two 8-GPU hosts
        (4, 16, "8", "gloo"),  # eight ranks on a 4-GPU host
    ],
)
def test_cuda_backend_follows_ranks_per_gpu(monkeypatch, gpus, world, local, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert process_group_backend(True, world) == expected


def test_cpu_tensors_always_use_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert process_group_backend(False, 2) == "gloo"
