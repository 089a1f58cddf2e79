"""Gram-matrix accumulation for router statistics: G += X^T X (lower triangle), s += sum(X), n.

The statistics of a bias-augmented feature z = [x, 1] are (G, s, n): callers never build [x, 1]
or a one-hot target. Only the lower triangle of G is written, in tiles on and below the diagonal,
which does about half the flops of a full product; `symmetrize` recovers the full matrix.

Precision: products are formed in fp32 ("fp32", the default on the CPU) or fp64 ("fp64") and
added into `gram` in its own dtype, so an fp64 store keeps the rounding of a long stream at the
level of one batch's product rather than growing with the number of batches.

Triton backend (kernels/gram.py, one launch for all layers, fp32 accumulators added straight into
the stored tiles). What `precision` means there:
- bf16 / fp16 inputs always use their own tensor-core dot: a product of two 16-bit numbers is exact
  in fp32, so this is as accurate as "fp32" and the fastest path.
- fp32 inputs: None (the default, chosen for accuracy) and "fp32" use exact fp32 products
  (input_precision="ieee", CUDA cores); "tf32x3" splits each operand into two tf32 halves (about
  fp32 accuracy on tensor cores); "tf32" and "bf16" round the inputs (1e-3..1e-2 relative error
  in G on heavy-tailed data) for tensor-core speed.
- "fp64" is not a Triton path: it runs the torch backend.
"""

import torch

from fastdume.ops import _backend

PRECISIONS = ("fp32", "fp64", "tf32", "tf32x3", "bf16")
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


def _check_finite(values):
    if not bool(torch.isfinite(values).all()):
        raise ValueError("x contains NaN or Inf; refusing to poison the statistics")


def gram_accumulate_torch(x, gram, colsum, mask=None, precision=None):
    if mask is not None:
        x = x[..., mask.bool(), :]
    compute = torch.float64 if precision == "fp64" else torch.float32
    xc = x.to(compute)
    hidden = x.shape[-1]
    # A NaN/Inf anywhere in x makes its column sum non-finite: checking the sums (needed anyway)
    # instead of x saves a full pass over the input, and still raises before `gram` is touched.
    total = xc.sum(dim=-2)
    _check_finite(total)
    # One GEMM per row panel (its off-diagonal block and diagonal tile together): fewer, larger
    # products and no extra casts; in-place adds promote fp32 products into an fp64 store.
    for start in range(0, hidden, _TILE):
        stop = min(start + _TILE, hidden)
        panel = xc[..., start:stop].transpose(-1, -2) @ xc[..., :stop]
        panel[..., :, start:].tril_()
        gram[..., start:stop, :stop] += panel
    colsum += total
    return x.shape[-2]


def gram_accumulate(x, gram, colsum, mask=None, precision=None, backend=None):
    """Add X^T X to the lower triangle of `gram` and the column sums to `colsum`, in place.

    x: [N, H] or [L, N, H] (one launch for all L layers); mask: optional [N] token mask.
    Returns the number of tokens added.
    """
    _check(x, gram, colsum, mask, precision)
    which = _backend.resolve(backend, x.device)
    if which == "triton" and precision != "fp64":
        _check_finite(x)
        return gram_accumulate_triton(x, gram, colsum, mask, precision)
    return gram_accumulate_torch(x, gram, colsum, mask, precision)


def _triton_dtypes(x_dtype, precision, interpreted):
    """(round_dtype, dot_dtype, input_precision) for the kernel's constexprs."""
    native = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    if x_dtype in native:
        round_dtype, input_precision = native[x_dtype], "ieee"
    elif precision == "bf16":
        round_dtype, input_precision = "bf16", "ieee"
    else:
        round_dtype = "fp32"
        input_precision = precision if precision in ("tf32", "tf32x3") else "ieee"
    # The interpreter has no 16-bit dot: upcasting after the rounding gives the same exact products.
    dot_dtype = "fp32" if interpreted else round_dtype
    return round_dtype, dot_dtype, input_precision


def _config(x, interpreted, n_programs):
    if interpreted:  # small tiles keep the interpreter (numpy per program) quick
        return {"block_h": 16, "block_n": 16, "split_k": 1, "num_warps": 4, "num_stages": 1}
    block_n = 32 if x.dtype == torch.float32 else 64
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    # Split the tokens when there are too few tiles to fill the GPU (small d, one layer).
    split = max(1, min(2 * sms // max(n_programs, 1), x.shape[-2] // (8 * block_n)))
    return {"block_h": 128, "block_n": block_n, "split_k": split, "num_warps": 8, "num_stages": 3}


def gram_accumulate_triton(x, gram, colsum, mask=None, precision=None, config=None):
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16 for Triton, got {x.dtype}")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        return 0  # nothing to add (and no empty grid to launch)
    interpreted = x.device.type != "cuda"
    kern = _backend.kernels("gram", x.device)
    batched = x.dim() == 3
    x3, g3, s3 = (x, gram, colsum) if batched else (x[None], gram[None], colsum[None])
    m8 = None if mask is None else (mask != 0).to(torch.int8).contiguous()
    dtypes = _triton_dtypes(x.dtype, precision, interpreted)
    tiles = triton_cdiv(x.shape[-1], 128)
    cfg = config or _config(x, interpreted, tiles * (tiles + 1) // 2 * x3.shape[0])
    count = kern.launch(
        x3,
        g3,
        s3,
        m8,
        round_dtype=dtypes[0],
        dot_dtype=dtypes[1],
        precision=dtypes[2],
        **cfg,
    )
    return int(count.item())


def triton_cdiv(a, b):
    return -(-a // b)


def symmetrize(gram):
    """The full symmetric matrix from a lower-triangle-only Gram matrix."""
    lower = torch.tril(gram)
    return lower + torch.tril(gram, diagonal=-1).transpose(-1, -2)
