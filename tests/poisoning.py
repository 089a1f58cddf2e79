"""Poisoned allocations for kernel tests."""

import contextlib
from unittest import mock

import torch


@contextlib.contextmanager
def poisoned():
    """Every torch.empty inside is filled with NaN (floats) or garbage (ints), so a kernel that
    leaves part of an output or scratch buffer unwritten fails the comparison."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -777) if t.numel() else t

    with mock.patch.object(torch, "empty", empty):
        yield
