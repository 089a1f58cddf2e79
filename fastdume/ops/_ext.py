"""Load the compiled extensions once; callers fall back to torch when they are missing."""

import functools
import importlib


@functools.cache
def _load(name):
    try:
        return importlib.import_module(f"fastdume.{name}"), None
    except ImportError as exc:  # not built (e.g. FASTDUME_CUDA=0) or built for another Python
        return None, f"fastdume.{name} unavailable: {exc}"


def cpu_ext():
    """fastdume._C, or None when it was not built."""
    return _load("_C")[0]


def cuda_ext():
    """fastdume._C_cuda, or None when it was not built (no nvcc at install time)."""
    return _load("_C_cuda")[0]


def cuda_ext_ready():
    """True only when the CUDA module is built and sees a device."""
    mod = cuda_ext()
    return mod is not None and bool(mod.device_query()["available"])


def why_missing(name):
    """Human-readable reason an extension could not be loaded ("" when it loaded)."""
    return _load(name)[1] or ""
