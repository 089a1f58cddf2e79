"""Backend choice shared by every op: "torch" or "triton", and importing kernels safely.

Triton decides at decoration time whether a kernel is compiled or interpreted, so on a machine
without CUDA the interpreter switch must be set before `fastdume.kernels.*` is first imported.
"""

import functools
import importlib
import os

import torch

BACKENDS = ("torch", "triton")


@functools.cache
def triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(backend, device):
    """The backend an op should run: the user's choice, or the best one for `device`."""
    if backend is None:
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' requested but triton is not installed")
    return backend


def kernels(name, device):
    """Import `fastdume.kernels.<name>`; on a CPU device, under the Triton interpreter."""
    if device.type != "cuda":
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is "
                "imported; move the tensors to CUDA or use backend='torch'"
            )
    return importlib.import_module(f"fastdume.kernels.{name}")
