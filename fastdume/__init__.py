"""fastdume: training-free dynamic upcycling of dense experts into a Mixture-of-Experts.

Importing the package registers the DUME architecture with transformers' Auto classes and the
"fastdume" experts implementation (both through fastdume.moe); the other DUME building functions
are loaded on first use.
"""

import importlib

__version__ = "0.1.0"

from fastdume import moe  # noqa: E402  registers DUME with transformers' Auto classes

# Eager, because importing the submodule fastdume.upcycle would otherwise rebind the package
# attribute `upcycle` to that module, and `fastdume.upcycle(...)` would stop being the function.
from fastdume.merge.upcycle import upcycle  # noqa: E402, F401

_LAZY = {
    "RouterStats": "fastdume.router.stats",
    "collect_stats": "fastdume.router.collect",
    "solve_router": "fastdume.router.solve",
    "fit_router": "fastdume.router.solve",
    "add_expert": "fastdume.merge.dynamic",
    "remove_expert": "fastdume.merge.dynamic",
    "ridge_solve": "fastdume.ops.ridge",
}

__all__ = ["__version__", "moe", "upcycle", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastdume' has no attribute {name!r}")
