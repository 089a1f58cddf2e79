"""Router-fitting costs: Gram accumulation (fastdume.ops.gram) and the batched ridge solve
(fastdume.ops.ridge), each against the baselines named in issue 4/9, timed in the same run.

GPU cases (marked gpu) use the Triton backends at the issue's sizes; on a CPU the same cases run
at reduced sizes with the torch path. Ratios (baseline time / ours) are in extra_info; > 1 means
fastdume is faster. The heavy-tailed relative error of G vs float64 is reported too.
"""

import statistics
import time

import pytest
import torch

from fastdume.ops import gram as gram_ops
from fastdume.ops import ridge as ridge_ops
from fastdume.ops.gram import gram_accumulate, symmetrize
from fastdume.ops.ridge import ridge_solve

# Hidden sizes H: the d = H + 1 (769, 3073, 4097) counts the bias column, which fastdume
# keeps as the column sums and token count rather than as a column of ones in X.
GPU_GRAM = [(h, L) for h in (768, 3072, 4096) for L in (1, 28)]
CPU_GRAM = [(h, L) for h in (64, 192) for L in (1, 4)]
GPU_SOLVE = [(12, 769), (28, 3073), (32, 4097), (1000, 65)]
CPU_SOLVE = [(4, 97), (2, 193), (100, 33)]
EXPERTS = 8  # right-hand sides: one per domain


def _time(fn, reps=3):
    """Median seconds of `fn` (after one warm-up), synchronising CUDA around each call."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hidden(layers, n, d, device, dtype):
    """Heavy-tailed hidden states: Student-t channels, a few massive ones, non-zero means.
    Drawn a layer at a time so that only one layer is ever held in fp32."""
    out = torch.empty(layers, n, d, device=device, dtype=dtype)
    student = torch.distributions.StudentT(torch.tensor(4.0, device=device))
    for layer in out:
        x = student.sample((n, d))
        x[:, torch.randperm(d, device=device)[: max(1, d // 256)]] *= 30.0
        layer.copy_(x + 0.3 * torch.randn(d, device=device))
    return out


def _reference_gram(x):
    """The reference implementation: fp32 copy, concatenated bias column, full X^T X per layer."""
    out = []
    for layer in x:
        z = torch.cat([layer.float(), torch.ones_like(layer[:, :1], dtype=torch.float32)], 1)
        out.append(z.T @ z)
    return out


def _gram_case(benchmark, d, layers, n_tok, device):
    x = _hidden(layers, n_tok, d, device, torch.bfloat16)
    gram = torch.zeros(layers, d, d, device=device)
    colsum = torch.zeros(layers, d, device=device)
    backend = "triton" if device.type == "cuda" else "torch"
    ours = lambda: gram_accumulate(x, gram, colsum, backend=backend)
    benchmark(ours)
    t_ours = _time(ours)
    xt = x.transpose(-1, -2)
    t_ref = _time(lambda: _reference_gram(x))
    t_bf16 = _time(lambda: torch.bmm(xt, x))
    t_fp32 = _time(lambda: [xl.float().T @ xl.float() for xl in x])

    gram.zero_()
    gram_accumulate(x[:1], gram[:1], colsum[:1], backend=backend)
    x64 = x[0].double()
    exact = x64.T @ x64
    err = torch.linalg.norm(symmetrize(gram[0]).double() - exact) / torch.linalg.norm(exact)
    benchmark.extra_info.update(
        {
            "backend": backend,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "tokens": n_tok,
            "ours_s": t_ours,
            "speedup_vs_reference": t_ref / t_ours,
            "speedup_vs_torch_bf16_full": t_bf16 / t_ours,
            "speedup_vs_torch_fp32_full": t_fp32 / t_ours,
            "rel_err_vs_float64": float(err),
        }
    )
    assert err < 1e-4  # bf16 inputs give exact products; only fp32 accumulation remains


def _spd_batch(layers, n, device):
    """Router-statistics-like SPD matrices: normalised Gram of heavy-tailed features."""
    x = _hidden(layers, 2 * n, n, device, torch.float64)
    A = x.transpose(-1, -2) @ x / (2 * n)
    return A, torch.randn(layers, n, EXPERTS, dtype=torch.float64, device=device)


def _lu_solve(M, B):
    """torch.linalg.solve; on the CPU one matrix at a time, because the batched MKL LU of torch
    2.13's CPU build fails ("Pivots given to lu_solve must all be greater or equal to 1") once
    torch.set_num_threads has changed the thread count in the process (other benches do)."""
    if M.device.type == "cuda":
        return torch.linalg.solve(M, B)
    return torch.stack([torch.linalg.solve(m, b) for m, b in zip(M, B, strict=True)])


def _solve_case(benchmark, layers, n, device):
    A, B = _spd_batch(layers, n, device)
    lam = 1e-2
    backend = "triton" if device.type == "cuda" else "torch"
    ours = lambda: ridge_solve(A, B, lam, backend=backend)
    W = benchmark(ours)
    M = A + lam * torch.eye(n, dtype=torch.float64, device=device)
    t_ours = _time(ours)
    t_lu = _time(lambda: _lu_solve(M, B))
    t_chol = _time(lambda: torch.cholesky_solve(B, torch.linalg.cholesky(M)))
    res = torch.linalg.matrix_norm(M @ W - B) / torch.linalg.matrix_norm(B)
    if backend == "triton" and n <= ridge_ops.SMALL_N:  # one program per matrix vs blocked
        blocked = lambda: ridge_ops.ridge_solve_triton(A, B, lam, config={"small": False})
        benchmark.extra_info["speedup_vs_blocked_path"] = _time(blocked) / t_ours
    if backend == "triton":
        from fastdume.kernels.cholesky import GRAPHS

        benchmark.extra_info["launch_graphs"] = dict(GRAPHS.stats)
    benchmark.extra_info.update(
        {
            "backend": backend,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "ours_s": t_ours,
            "speedup_vs_lu_solve_fp64": t_lu / t_ours,
            "speedup_vs_cholesky_solve_fp64": t_chol / t_ours,
            "max_rel_residual": float(res.max()),
        }
    )
    assert float(res.max()) <= 1e-5


@pytest.mark.parametrize("h,layers", CPU_GRAM)
def test_gram_cpu(benchmark, h, layers):
    _gram_case(benchmark, h, layers, 1024, torch.device("cpu"))


@pytest.mark.parametrize("layers,n", CPU_SOLVE)
def test_solve_cpu(benchmark, layers, n):
    _solve_case(benchmark, layers, n, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("h,layers", GPU_GRAM)
def test_gram_gpu(benchmark, h, layers):
    _gram_case(benchmark, h, layers, 65536, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("layers,n", GPU_SOLVE)
def test_solve_gpu(benchmark, layers, n):
    _solve_case(benchmark, layers, n, torch.device("cuda"))


# Gram schedule options of kernels/gram.py against the shipped default config, same data.
SCHEDULES = {
    "deep_n128": {"block_n": 128, "num_warps": 8, "num_stages": 2},
    "grouped8": {"group_h": 8},
    "ordered_split4": {"split_k": 4, "ordered_split": True},
}


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("h", [768, 4096])
def test_gram_schedule_gpu(benchmark, h, schedule):
    x = _hidden(1, 65536, h, "cuda", torch.bfloat16)
    gram, colsum = torch.zeros(1, h, h, device="cuda"), torch.zeros(1, h, device="cuda")
    tiles = -(-h // 128)
    default = gram_ops._config(x, False, tiles * (tiles + 1) // 2)
    cfg = {**default, **SCHEDULES[schedule]}
    ours = lambda: gram_ops.gram_accumulate_triton(x, gram, colsum, config=cfg)
    benchmark(ours)
    t_ours = _time(ours)
    t_default = _time(lambda: gram_ops.gram_accumulate_triton(x, gram, colsum, config=default))
    t_bf16 = _time(lambda: x[0].T @ x[0])
    gram.zero_()
    gram_ops.gram_accumulate_triton(x, gram, colsum, config=cfg)
    exact = x[0].double().T @ x[0].double()
    err = torch.linalg.norm(symmetrize(gram[0]).double() - exact) / torch.linalg.norm(exact)
    benchmark.extra_info.update(
        {"config": cfg, "ours_s": t_ours, "speedup_vs_default_config": t_default / t_ours,
         "speedup_vs_torch_bf16_full": t_bf16 / t_ours, "rel_err_vs_float64": float(err)}
    )  # fmt: skip
    assert err < 1e-4
