"""Gram-matrix accumulation for router statistics: G += X^T X (lower triangle), s += sum(X), n.

The statistics of a bias-augmented feature z = [x, 1] are (G, s, n): callers never build [x, 1]
or a one-hot target. Only the lower triangle of G is written, in tiles on and below the diagonal,
which does about half the flops of a full product; `symmetrize` recovers the full matrix.

Precision: products are formed in fp32 ("fp32", the default on the CPU) or fp64 ("fp64") and
added into `gram` in its own dtype, so an fp64 store keeps the rounding of a long stream at the
level of one batch's product rather than growing with the number of batches.
"""

import torch

from fastdume.ops import _backend

PRECISIONS = ("fp32", "fp64", "tf32", "bf16")
_TILE = 256


def _check(x, gram, colsum, mask, precision):
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [N, H] or [L, N, H], got shape {tuple(x.shape)}")
    lead, hidden = tuple(x.shape[:-2]), x.shape[-1]
    if tuple(gram.shape) != (*lead, hidden, hidden):
        raise ValueError(f"gram must be {(*lead, hidden, hidden)}, got {tuple(gram.shape)}")
    if tuple(colsum.shape) != (*lead, hidden):
        raise ValueError(f"colsum must be {(*lead, hidden)}, got {tuple(colsum.shape)}")
    if gram.dtype not in (torch.float32, torch.float64) or colsum.dtype != gram.dtype:
        raise ValueError(
            f"gram and colsum must share dtype float32 or float64, got {gram.dtype}, {colsum.dtype}"
        )
    if mask is not None and tuple(mask.shape) != (x.shape[-2],):
        raise ValueError(f"mask must be [N={x.shape[-2]}], got shape {tuple(mask.shape)}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    for name, t in (("gram", gram), ("colsum", colsum), ("mask", mask)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf; refusing to poison the statistics")


def gram_accumulate_torch(x, gram, colsum, mask=None, precision=None):
    if mask is not None:
        x = x[..., mask.bool(), :]
    compute = torch.float64 if precision == "fp64" else torch.float32
    xc = x.to(compute)
    hidden = x.shape[-1]
    for start in range(0, hidden, _TILE):
        stop = min(start + _TILE, hidden)
        rows = xc[..., start:stop].transpose(-1, -2)
        if start:
            gram[..., start:stop, :start] += (rows @ xc[..., :start]).to(gram.dtype)
        diag = rows @ xc[..., start:stop]
        gram[..., start:stop, start:stop] += torch.tril(diag).to(gram.dtype)
    colsum += xc.sum(dim=-2).to(colsum.dtype)
    return x.shape[-2]


def gram_accumulate(x, gram, colsum, mask=None, precision=None, backend=None):
    """Add X^T X to the lower triangle of `gram` and the column sums to `colsum`, in place.

    x: [N, H] or [L, N, H] (one launch for all L layers); mask: optional [N] token mask.
    Returns the number of tokens added.
    """
    _check(x, gram, colsum, mask, precision)
    which = _backend.resolve(backend, x.device)
    if which == "triton":
        raise NotImplementedError("the Triton Gram backend is not built yet")
    return gram_accumulate_torch(x, gram, colsum, mask, precision)


def symmetrize(gram):
    """The full symmetric matrix from a lower-triangle-only Gram matrix."""
    lower = torch.tril(gram)
    return lower + torch.tril(gram, diagonal=-1).transpose(-1, -2)
