"""Batched ridge solve (A + lam I)^-1 B through a Cholesky factorisation.

The torch path factorises in float64: router statistics summed over millions of tokens are
ill-conditioned, and the solve is tiny next to accumulating them. A matrix that is not positive
definite is retried with growing diagonal jitter (that matrix only), with a warning naming the
amount; non-finite input raises.
"""

import warnings

import torch

from fastdume.ops import _backend

# Jitter grows 1e-10 -> 1e-4 of the mean diagonal: enough for rounding, never for a wrong matrix.
_JITTER_TRIES = 4


def _check(A, B, lam):
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

    lam: a float or a tensor broadcastable to the batch shape. Returns float64 on the torch path
    (cast as needed); the Triton path returns float32 refined to float64 accuracy.
    """
    _check(A, B, lam)
    which = _backend.resolve(backend, A.device)
    if which == "triton":
        raise NotImplementedError("the Triton ridge backend is not built yet")
    return ridge_solve_torch(A, B, lam)
