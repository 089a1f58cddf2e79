"""Step 1-2 of the attack: a surrogate trained on the attacker's layers only, and Delta."""

import copy
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

from .train import sft


def train_surrogate(base, encoded, stage_names, steps, lr, batch_size, pad_id, seed=0):
    """A copy of base where only stage_names were trained on the backdoor set."""
    surrogate = copy.deepcopy(base)
    losses = sft(surrogate, encoded, steps, lr, batch_size, pad_id, stage_names, seed)
    return surrogate, losses


@torch.no_grad()
def backdoor_delta(base, surrogate, stage_names):
    """Delta = surrogate - base on the stage's parameters (nothing else is returned)."""
    b, s = dict(base.named_parameters()), dict(surrogate.named_parameters())
    missing = [n for n in stage_names if n not in b or n not in s]
    if missing:
        raise ValueError(f"stage_names must be parameters of both models, missing: {missing[:3]}")
    return {n: (s[n] - b[n]).detach().clone().contiguous() for n in stage_names}


def save_delta(delta, path):
    """Write Delta as safetensors through a temporary name, so a crash leaves no half file."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in delta.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_delta(path):
    return load_file(os.fspath(path))
