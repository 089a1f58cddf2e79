"""The one-program-per-matrix Cholesky + solve (kernels/cholesky.small_kernel, n <= 128) under the
Triton interpreter against float64 numpy, and its dispatch from fastdume.ops.ridge: launches for
a whole batch, float64-level answers through the refinement, n = 129 on the blocked path."""

import numpy as np
import pytest
import test_ridge
import torch
from test_ridge import _residual, _spd
from triton.runtime.interpreter import InterpretedFunction

import fastdume.ops.ridge as ridge
from fastdume.ops import _backend

BS = 16
fallback_spy = test_ridge.fallback_spy  # the fixture, shared


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched (interpreter), in order."""
    names = []
    real = InterpretedFunction.run

    def run(self, *args, **kwargs):
        names.append(self.__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return names


@pytest.mark.parametrize("n,m", [(1, 1), (17, 3), (65, 8), (128, 20)])
def test_small_kernel_factors_and_solves_like_numpy(n, m):
    kern = _backend.kernels("cholesky", torch.device("cpu"))
    batch = 1 if n > 64 else 2  # the interpreter runs the programs one after the other
    A = _spd(batch, n, 1e3)
    lower = torch.ones(n, n, dtype=torch.bool).tril()
    work = torch.where(lower, A.float(), float("nan")).contiguous()  # poisoned upper triangle
    dinv, info = kern.workspace(work, BS)
    dinv.fill_(float("nan"))
    info.fill_(-7)
    B = torch.randn(batch, n, m, dtype=torch.float64)
    x = B.float().contiguous()
    kern.small(work, dinv, info, x, factor=True, precision="ieee", bs=BS, br=BS, bm=BS)
    assert info.tolist() == [0] * batch
    assert torch.isnan(work[:, ~lower]).all(), "upper triangle was written"
    for b in range(batch):
        L = np.linalg.cholesky(A[b].numpy())
        np.testing.assert_allclose(work[b].tril().double().numpy(), L, rtol=0, atol=3e-5)
        ref = np.linalg.solve(A[b].numpy(), B[b].numpy())
        np.testing.assert_allclose(x[b].double().numpy(), ref, rtol=0, atol=1e-4 * abs(ref).max())
    # solve-only launches reuse the stored factor
    y = B.flip(-1).float().contiguous()
    kern.small(work, dinv, info, y, factor=False, precision="ieee", bs=BS, br=BS, bm=BS)
    ref = np.linalg.solve(A.numpy(), B.flip(-1).numpy())
    np.testing.assert_allclose(y.double().numpy(), ref, rtol=0, atol=1e-4 * abs(ref).max())


def test_small_kernel_flags_only_the_bad_matrix():
    kern = _backend.kernels("cholesky", torch.device("cpu"))
    A = _spd(3, 40, 1e2)
    A[1, 25, 25] = -5.0  # pivot 26 of matrix 1 fails
    work = A.float().contiguous()
    dinv, info = kern.workspace(work, BS)
    x = torch.randn(3, 40, 2).contiguous()
    kern.small(work, dinv, info, x, factor=True, precision="ieee", bs=BS, br=BS, bm=BS)
    _, ref_info = torch.linalg.cholesky_ex(A)
    assert info.tolist() == ref_info.tolist() == [0, 26, 0]
    assert torch.isfinite(x[[0, 2]]).all()


def test_many_small_systems_in_at_most_four_launches(launches, fallback_spy):
    """Router-like systems of n = 65 (the bias-augmented d of a 64-wide model): the launch count
    does not grow with the batch (6 here to keep the interpreter quick; 1000 on a GPU)."""
    torch.manual_seed(3)
    x = torch.randn(6, 130, 65, dtype=torch.float64)
    A = x.mT @ x / 130
    B = torch.randn(6, 65, 8, dtype=torch.float64)
    W = ridge.ridge_solve(A, B, 1e-2, backend="triton")
    assert len(launches) <= 4 and set(launches) == {"small_kernel"}, launches
    assert fallback_spy == []
    M = A + 1e-2 * torch.eye(65, dtype=torch.float64)
    assert (_residual(A, B, 1e-2, W) <= 1e-12).all()
    ref = np.linalg.solve(M.numpy(), B.numpy())
    np.testing.assert_allclose(W.numpy(), ref, rtol=0, atol=1e-10 * abs(ref).max())


@pytest.mark.parametrize("n", [128, 129])
def test_size_limit_picks_the_path(n, launches, fallback_spy):
    """n = 128 is one program per matrix; n = 129 goes to the blocked kernels; both refine to
    float64 level."""
    A = _spd(1, n, 1e4, scale=5.0)
    B = torch.randn(1, n, 2, dtype=torch.float64)
    W = ridge.ridge_solve(A, B, 1e-3, backend="triton")
    small = n <= ridge.SMALL_N
    assert ("small_kernel" in launches) == small
    assert ("factor_diag_kernel" in launches) == (not small)
    assert fallback_spy == []
    assert (_residual(A, B, 1e-3, W) <= 1e-12).all()


def test_small_and_blocked_paths_agree():
    A = _spd(2, 40, 1e5)
    B = torch.randn(2, 40, 3, dtype=torch.float64)
    small = ridge.ridge_solve_triton(A, B, 1e-3)
    blocked = ridge.ridge_solve_triton(A, B, 1e-3, config={"small": False})
    torch.testing.assert_close(small, blocked, rtol=1e-9, atol=1e-9 * blocked.abs().max().item())


class FakeCuda:
    """torch.cuda's graph API, emulated: inside `graph(g)` launches are recorded, not run."""

    def __init__(self):
        self.capturing, self.stream = None, 7

    def is_current_stream_capturing(self):
        return False

    def current_stream(self):
        return type("Stream", (), {"cuda_stream": self.stream})()

    class CUDAGraph:
        def __init__(self):
            self.recorded = []

        def replay(self):
            for fn in self.recorded:
                fn(replayed=True)

    def graph(self, g):
        fake = self

        class Capture:
            def __enter__(self):
                fake.capturing = g

            def __exit__(self, *exc):
                fake.capturing = None

        return Capture()


def test_launch_graphs_capture_on_second_sight_and_replay():
    from fastdume.kernels.cholesky import LaunchGraphs

    api = FakeCuda()
    graphs = LaunchGraphs(api=api, size=2)
    ran = []

    def launch(tag):
        def kernel(replayed=False):
            ran.append((tag, replayed))

        def run():  # a "kernel launch": recorded while capturing, else executed
            api.capturing.recorded.append(kernel) if api.capturing else kernel()

        return run

    graphs.run(("a",), launch("a"))  # first sight: eager
    graphs.run(("a",), launch("a"))  # second: captured (not run), then replayed once
    graphs.run(("a",), launch("a"))  # replay only
    assert ran == [("a", False), ("a", True), ("a", True)]
    assert graphs.stats == {"eager": 1, "captured": 1, "replayed": 2}
    api.stream = 8  # another stream is another key
    graphs.run(("a",), launch("a"))
    assert ran[-1] == ("a", False)
    for tag in ("b", "c", "b", "c"):  # LRU of 2: the graph of "a" on stream 7 is dropped
        graphs.run((tag,), launch(tag))
    api.stream = 7
    graphs.run(("a",), launch("a"))
    assert ran[-1] == ("a", False) and len(graphs.graphs) <= 2


@pytest.mark.gpu
def test_gpu_blocked_path_replays_a_cuda_graph():
    """n = 300: the blocked path eager once, then captured and replayed, same answers."""
    from fastdume.kernels.cholesky import GRAPHS

    A = _spd(2, 300, 1e4, scale=5.0).cuda()
    B = torch.randn(2, 300, 4, dtype=torch.float64).cuda()
    before = GRAPHS.stats["replayed"]
    runs = [ridge.ridge_solve(A, B, 1e-3) for _ in range(3)]
    assert GRAPHS.stats["replayed"] > before
    for W in runs:
        assert (_residual(A, B, 1e-3, W) <= 1e-12).all()
    torch.testing.assert_close(runs[2], runs[0], rtol=0, atol=1e-12 * runs[0].abs().max().item())


@pytest.mark.gpu
def test_gpu_many_small_systems():
    torch.manual_seed(4)
    x = torch.randn(1000, 130, 65, dtype=torch.float64, device="cuda")
    A = x.mT @ x / 130
    B = torch.randn(1000, 65, 8, dtype=torch.float64, device="cuda")
    W = ridge.ridge_solve(A, B, 1e-2)
    assert (_residual(A, B, 1e-2, W) <= 1e-12).all()
    ref = ridge.ridge_solve(A, B, 1e-2, backend="torch")
    torch.testing.assert_close(W, ref, rtol=0, atol=1e-10 * ref.abs().max().item())
