"""Test-wide setup: offline hub, Triton interpreter on CPU-only machines, markers, seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (torch does not import triton, so the switch below is still in time)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    markexpr = config.option.markexpr or ""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    kept, deselected = [], []
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and "slow" not in markexpr:
            deselected.append(item)
        else:
            kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two on a loaded CPU.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def test_zoo():
    """The `test` preset of the model zoo: a tiny base and one dense expert per domain (cached)."""
    from fastdume.data.zoo import build_zoo

    return build_zoo("test")
