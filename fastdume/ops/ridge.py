"""Batched ridge solve (A + lam I)^-1 B through a Cholesky factorisation.

The torch path factorises in float64: router statistics summed over millions of tokens are
ill-conditioned, and the solve is tiny next to accumulating them. A matrix that is not positive
definite is retried with growing diagonal jitter (that matrix only), with a warning naming the
amount; non-finite input raises.

The Triton path (kernels/cholesky.py, the default on CUDA) factorises in fp32 with a blocked
right-looking Cholesky and refines to float64 accuracy: the matrix is first Jacobi-scaled
(unit diagonal, which helps the heavy-tailed channels of real hidden states), each refinement step
computes the residual B - (A + lam I) W in float64 with torch and solves for the correction with
the same fp32 factor. A matrix whose fp32 factorisation hits a non-positive pivot, or whose
refinement does not reach float64-level residuals, is redone by the float64 torch path above (that
matrix only), which applies the jitter retry and raises for a matrix that is not SPD.
Launches, n <= 128 (many small systems, e.g. 1000 routers of n = 65): one program per matrix
(kernels/cholesky.small_kernel) factors and solves the whole batch in 1 launch, and each refinement
step is 1 more (router-like systems of n = 65 need 1 step: 2 launches, against 17 blocked).
Larger n: 3 launches per 64-column block plus 2 per solve, from a host loop that on CUDA is
captured as a CUDA graph and replayed from the second call with the same buffers on (why a graph
and not a persistent kernel: kernels/cholesky.py).
"""

import warnings

import torch

from fastdume.ops import _backend

# Jitter grows 1e-10 -> 1e-4 of the mean diagonal: enough for rounding, never for a wrong matrix.
_JITTER_TRIES = 4
SMALL_N = 128  # kernels/cholesky.py SMALL_N: one program per matrix up to here


def _check(A, B, lam):
    for name, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{name} must be one torch.Tensor (a batch of equal-size matrices), "
                f"got {type(t).__name__}"
            )
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be [..., n, n], got shape {tuple(A.shape)}")
    if B.dim() != A.dim() or B.shape[:-1] != A.shape[:-1]:
        raise ValueError(
            f"B must be [..., n, m] with the batch and n of A {tuple(A.shape)}, "
            f"got shape {tuple(B.shape)}"
        )
    if B.device != A.device:
        raise ValueError(f"B is on {B.device} but A is on {A.device}")
    lam_t = torch.as_tensor(lam, dtype=torch.float64)
    if not bool(torch.isfinite(lam_t).all()) or bool((lam_t < 0).any()):
        raise ValueError(f"lam must be finite and >= 0, got {lam!r}")
    for name, t in (("A", A), ("B", B)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")


def _cholesky_with_jitter(M):
    L, info = torch.linalg.cholesky_ex(M)
    failed = info != 0
    if not bool(failed.any()):
        return L
    scale = M.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-300)
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    for attempt in range(_JITTER_TRIES):
        jitter = scale * 1e-10 * 100.0**attempt
        retry = M + torch.where(failed, jitter, 0.0)[..., None, None] * eye
        L_retry, info = torch.linalg.cholesky_ex(retry)
        L = torch.where(failed[..., None, None], L_retry, L)
        amount = float(jitter[failed].max())
        failed = failed & (info != 0)
        if not bool(failed.any()):
            warnings.warn(
                f"ridge_solve: matrix not positive definite; added diagonal jitter up to "
                f"{amount:.3g}",
                RuntimeWarning,
                stacklevel=3,
            )
            return L
    raise torch.linalg.LinAlgError(
        f"ridge_solve: {int(failed.sum())} matrix(es) not positive definite even with jitter "
        f"{amount:.3g}; increase lam"
    )


def ridge_solve_torch(A, B, lam):
    A64 = A.to(torch.float64)
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=A.device)
    eye = torch.eye(A.shape[-1], dtype=torch.float64, device=A.device)
    L = _cholesky_with_jitter(A64 + lam_t[..., None, None] * eye)
    return torch.cholesky_solve(B.to(torch.float64), L)


def ridge_solve(A, B, lam, backend=None):
    """(A + lam I)^-1 B for SPD A [..., n, n] and B [..., n, m], batched over leading dims.

    lam: a float or a tensor broadcastable to the batch shape. Returns float64 on both paths
    (the Triton path: an fp32 factorisation refined to float64 accuracy).
    """
    _check(A, B, lam)
    which = _backend.resolve(backend, A.device)
    if which == "triton":
        return ridge_solve_triton(A, B, lam)
    return ridge_solve_torch(A, B, lam)


# Refinement stops once every normwise backward error ||B - M W|| / (||M|| ||W|| + ||B||) is at
# float64 rounding level (or stops improving); a matrix still above _FALLBACK_ETA (refinement too
# slow: cond(M) near 1 / fp32 eps) is solved again in float64 by torch. Without refinement the
# fp32 answer is kept if it is fp32-level.
_TARGET_ETA = 64 * torch.finfo(torch.float64).eps
_FALLBACK_ETA = {True: 1e-13, False: 1e-5}
_MAX_REFINE = 10


def _solver_config(device, n):
    """Tiles, and `small`: n <= 128 takes the one-program-per-matrix kernel."""
    small = n <= SMALL_N
    if device.type != "cuda":  # interpreter: small tiles, numpy runs each program serially
        tiles = {"bs": 16, "bt": 16, "br": 16, "bm": 16, "num_warps": 4}
        return {"precision": "ieee", "small": small, **tiles}
    # tf32x3: fp32-level products on tensor cores; smaller blocks for small matrices. The small
    # kernel's right-hand-side chunk is 16 (the smallest dot N): routers have ~8 experts.
    bs = 32 if small else 64
    tiles = {"bs": bs, "bt": bs, "br": 64, "bm": 16 if small else 32, "num_warps": 4}
    return {"precision": "tf32x3", "small": small, **tiles}


def ridge_solve_triton(A, B, lam, refine=True, config=None):
    """fp32 blocked Cholesky (Triton) + float64 iterative refinement; see the module docstring."""
    kern = _backend.kernels("cholesky", A.device)
    batch_shape, n, m = A.shape[:-2], A.shape[-1], B.shape[-1]
    if A.numel() == 0 or B.numel() == 0:  # nothing to factor or no right-hand side
        return torch.zeros(B.shape, dtype=torch.float64, device=B.device)
    M = A.to(torch.float64).reshape(-1, n, n)
    B64 = B.to(torch.float64).reshape(-1, n, m)
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=A.device)
    lam_b = torch.broadcast_to(lam_t, batch_shape).reshape(-1)
    M = M + lam_b[:, None, None] * torch.eye(n, dtype=torch.float64, device=A.device)
    cfg = {**_solver_config(A.device, n), **(config or {})}
    tiles = {"precision": cfg["precision"], "num_warps": cfg["num_warps"]}
    small = cfg["small"] and n <= SMALL_N

    diag = M.diagonal(dim1=-2, dim2=-1)
    scale = torch.where(diag > 0, diag.clamp_min(1e-300).rsqrt(), 1.0)  # Jacobi scaling
    work = (M * scale[:, :, None] * scale[:, None, :]).to(torch.float32).contiguous()
    dinv, info = kern.workspace(work, cfg["bs"])
    factored = not small  # the small kernel factors in the launch of the first solve
    graph = A.device.type == "cuda"  # the blocked path's launch loops as CUDA graph replays
    if factored:
        kern.factor(work, dinv, info, bs=cfg["bs"], bt=cfg["bt"], br=cfg["br"], graph=graph,
                    **tiles)  # fmt: skip

    def solve(rhs):  # M^-1 rhs with the fp32 factor, rhs float64 [b, n, m]
        nonlocal factored
        size = rhs.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
        x = (rhs * scale[:, :, None] / size).to(torch.float32).contiguous()
        if small:
            kern.small(work, dinv, info, x, factor=not factored, bs=cfg["bs"], br=cfg["br"],
                       bm=cfg["bm"], **tiles)  # fmt: skip
            factored = True
        else:
            kern.solve(work, dinv, x, bs=cfg["bs"], bm=cfg["bm"], graph=graph, **tiles)
        return x.to(torch.float64) * scale[:, :, None] * size

    m_norm, b_norm = torch.linalg.matrix_norm(M), torch.linalg.matrix_norm(B64)

    def backward_error(W):
        denom = (m_norm * torch.linalg.matrix_norm(W) + b_norm).clamp_min(1e-300)
        return torch.linalg.matrix_norm(B64 - M @ W) / denom

    W = solve(B64)
    eta = backward_error(W)
    for _ in range(_MAX_REFINE if refine else 0):
        if bool((eta <= _TARGET_ETA).all()):
            break
        W_next = W + solve(B64 - M @ W)
        eta_next = backward_error(W_next)
        W = torch.where((eta_next < eta)[:, None, None], W_next, W)  # keep the best iterate
        stalled = not bool((eta_next < 0.5 * eta).any())
        eta = torch.minimum(eta, eta_next)
        if stalled:
            break

    redo = (info != 0) | ~(eta <= _FALLBACK_ETA[bool(refine)])
    if bool(redo.any()):
        W[redo] = ridge_solve_torch(A.reshape(-1, n, n)[redo], B64[redo], lam_b[redo])
    return W.reshape(*batch_shape, n, m)
