"""Which torch.distributed backend a process group should use."""

import os

import torch


def process_group_backend(use_cuda, world):
    """gloo for CPU tensors; NCCL for CUDA tensors only when every rank on this host has a GPU of
    its own. NCCL refuses two ranks on one GPU, so ranks that share one reduce through gloo.

    world: the number of ranks; torchrun's LOCAL_WORLD_SIZE, when set, is the count on this host.
    """
    if not use_cuda:
        return "gloo"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return "cpu:gloo,cuda:nccl" if local <= torch.cuda.device_count() else "gloo"
