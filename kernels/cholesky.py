"""Batched blocked right-looking Cholesky (lower) and the two triangular solves, in fp32.

For each block column k0 (BS wide), for every matrix of the batch at once:
  1. factor_diag_kernel, grid (batch,): factor the BS x BS diagonal block in registers (BS
     sequential column steps), invert it with log2(BS) tl.dot squarings (kept in `dinv` for the
     panel and the solves), record the first failed pivot of that matrix in `info`.
  2. panel_kernel, grid (BR-row chunks, batch): L21 = A21 L11^-T, one tl.dot per chunk.
  3. update_kernel, grid (trailing lower tiles, batch): A22 -= L21 L21^T, one BT x BT tile per
     program, a tl.dot with K = BS on tensor cores; only tiles on and below the diagonal.
Then solve_kernel, grid (batch, RHS chunks), runs the forward (L Y = B) and the backward
(L^T X = Y) substitution block by block, each block a tl.dot with the off-diagonal blocks already
solved and one product with the stored inverse diagonal block.

Launches: 3 per block column + 2 per solve, issued asynchronously from a host loop (neither a
persistent kernel nor a captured CUDA graph yet). The matrix stays in global memory/L2 between
steps. Dots take PRECISION ("tf32x3" on GPU: fp32-level products on tensor cores).
Tile shapes: BS = BT = 64 (32 for n <= 128), BR = 64 on GPU: the register factorisation of a
64 x 64 block is 64 short steps, and a 64-deep dot keeps the update on tensor cores while the
trailing tile grid still has hundreds of programs at n >= 1k; the interpreter tests use 16
through the same constexprs.
Only the lower triangle of the working matrix is read or written.
"""

import torch
import triton
import triton.language as tl
from fastdume.kernels.gram import lower_tile_coords


@triton.jit
def _factor_block(a, BS: tl.constexpr):
    """Unblocked Cholesky of a lower BS x BS tile in registers -> (L, its pivots).

    A pivot that is not > 0 (NaN included) is replaced by 1 so the sweep stays finite; the caller
    reports it. Two reductions per column: that is the whole sequential cost of the block.
    """
    idx = tl.arange(0, BS)
    c = idx[None, :]
    pivots = tl.zeros((BS,), dtype=tl.float32)
    for j in range(BS):
        at_j = idx == j
        col = tl.sum(tl.where(c == j, a, 0.0), axis=1)
        piv = tl.sum(tl.where(at_j, col, 0.0), axis=0)
        pivots = tl.where(at_j, piv, pivots)
        lcol = tl.where(idx >= j, col / tl.sqrt_rn(tl.where(piv > 0.0, piv, 1.0)), 0.0)
        a = tl.where(c == j, lcol[:, None], a - lcol[:, None] * lcol[None, :])
    return a, pivots


@triton.jit
def _invert_lower(low, diag, PRECISION: tl.constexpr, BS: tl.constexpr, LOG_BS: tl.constexpr):
    """L^-1 by tl.dot instead of BS sequential steps: with D = diag(L) and S = D^-1 L - I
    (strictly lower, so S^BS = 0), L^-1 = (I - S)(I + S^2)(I + S^4)...(I + S^(BS/2)) D^-1."""
    idx = tl.arange(0, BS)
    eye = tl.where(idx[:, None] == idx[None, :], 1.0, 0.0)
    s = low / diag[:, None] - eye
    res = eye - s
    power = s
    for _ in tl.static_range(LOG_BS - 1):
        power = tl.dot(power, power, input_precision=PRECISION)
        res += tl.dot(res, power, input_precision=PRECISION)
    return res / diag[None, :]


@triton.jit
def factor_diag_kernel(
    a_ptr,  # [B, n, n] fp32 working matrix, lower triangle overwritten by L
    dinv_ptr,  # [B, nblocks, BS, BS] fp32 inverses of the diagonal blocks
    info_ptr,  # [B] int32: 0, or 1 + the first column whose pivot failed
    n,
    k0,
    stride_ab,
    stride_ar,
    stride_ac,
    stride_db,
    stride_dk,
    PRECISION: tl.constexpr,
    BS: tl.constexpr,
    LOG_BS: tl.constexpr,  # log2(BS): the number of squarings in _invert_lower
):
    b = tl.program_id(0).to(tl.int64)
    a_mat = a_ptr + b * stride_ab
    idx = tl.arange(0, BS)
    r = (k0 + idx)[:, None]
    c = (k0 + idx)[None, :]
    inside = (r < n) & (c < n) & (r >= c)
    blk = tl.load(a_mat + r * stride_ar + c * stride_ac, mask=inside, other=0.0)
    blk = tl.where((r >= n) & (r == c), 1.0, blk)  # identity padding past n is harmless

    low, pivots = _factor_block(blk, BS)
    failed = ~(pivots > 0.0)  # NaN fails too
    inv = _invert_lower(low, tl.sqrt_rn(tl.where(failed, 1.0, pivots)), PRECISION, BS, LOG_BS)
    tl.store(a_mat + r * stride_ar + c * stride_ac, low, mask=inside)
    d_ptrs = dinv_ptr + b * stride_db + (k0 // BS) * stride_dk + idx[:, None] * BS + idx[None, :]
    tl.store(d_ptrs, inv)
    fail = tl.min(tl.where(failed, idx, BS), axis=0)
    old = tl.load(info_ptr + b)
    tl.store(info_ptr + b, tl.where((old == 0) & (fail < BS), k0 + fail + 1, old))


@triton.jit
def panel_kernel(
    a_ptr,
    dinv_ptr,
    n,
    k0,
    stride_ab,
    stride_ar,
    stride_ac,
    stride_db,
    stride_dk,
    PRECISION: tl.constexpr,
    BS: tl.constexpr,
    BR: tl.constexpr,
):
    """L21 = A21 L11^-T for one BR-row chunk of the panel below the diagonal block."""
    b = tl.program_id(1).to(tl.int64)
    a_mat = a_ptr + b * stride_ab
    idx = tl.arange(0, BS)
    inv = tl.load(dinv_ptr + b * stride_db + (k0 // BS) * stride_dk + idx[:, None] * BS + idx)
    prow = k0 + BS + tl.program_id(0) * BR + tl.arange(0, BR)
    c = (k0 + idx)[None, :]
    p_ptrs = a_mat + prow[:, None] * stride_ar + c * stride_ac
    pmask = (prow[:, None] < n) & (c < n)
    a21 = tl.load(p_ptrs, mask=pmask, other=0.0)
    tl.store(p_ptrs, tl.dot(a21, tl.trans(inv), input_precision=PRECISION), mask=pmask)


@triton.jit
def update_kernel(
    a_ptr,
    n,
    k0,
    stride_ab,
    stride_ar,
    stride_ac,
    PRECISION: tl.constexpr,
    BS: tl.constexpr,
    BT: tl.constexpr,
):
    ti, tj = lower_tile_coords(tl.program_id(0))
    a_mat = a_ptr + tl.program_id(1).to(tl.int64) * stride_ab
    start = k0 + BS
    rows = start + ti * BT + tl.arange(0, BT)
    cols = start + tj * BT + tl.arange(0, BT)
    ks = k0 + tl.arange(0, BS)
    kmask = ks[None, :] < n
    li = tl.load(
        a_mat + rows[:, None] * stride_ar + ks[None, :] * stride_ac,
        mask=(rows[:, None] < n) & kmask,
        other=0.0,
    )
    lj = tl.load(
        a_mat + cols[:, None] * stride_ar + ks[None, :] * stride_ac,
        mask=(cols[:, None] < n) & kmask,
        other=0.0,
    )
    prod = tl.dot(li, tl.trans(lj), input_precision=PRECISION)
    t_ptrs = a_mat + rows[:, None] * stride_ar + cols[None, :] * stride_ac
    tmask = (rows[:, None] < n) & (cols[None, :] < n) & (rows[:, None] >= cols[None, :])
    tile = tl.load(t_ptrs, mask=tmask, other=0.0)
    tl.store(t_ptrs, tile - prod, mask=tmask)


@triton.jit
def solve_kernel(
    l_ptr,  # [B, n, n] factor (lower triangle valid)
    dinv_ptr,  # [B, nblocks, BS, BS]
    x_ptr,  # [B, n, m] fp32: right-hand sides in, solution out (in place)
    n,
    m,
    stride_lb,
    stride_lr,
    stride_lc,
    stride_db,
    stride_dk,
    stride_xb,
    stride_xr,
    stride_xc,
    TRANS: tl.constexpr,  # False: solve L Y = B; True: solve L^T X = Y
    PRECISION: tl.constexpr,
    BS: tl.constexpr,
    BM: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    l_mat = l_ptr + b * stride_lb
    x_mat = x_ptr + b * stride_xb
    idx = tl.arange(0, BS)
    rhs = tl.program_id(1) * BM + tl.arange(0, BM)
    nblocks = tl.cdiv(n, BS)
    for step in range(nblocks):
        blk = step
        if TRANS:
            blk = nblocks - 1 - step
        rows = blk * BS + idx
        x_ptrs = x_mat + rows[:, None] * stride_xr + rhs[None, :] * stride_xc
        xmask = (rows[:, None] < n) & (rhs[None, :] < m)
        acc = tl.load(x_ptrs, mask=xmask, other=0.0)
        # Subtract the contributions of the blocks solved before this one.
        for other in range(step):
            oblk = other
            if TRANS:
                oblk = nblocks - 1 - other
            orows = oblk * BS + idx
            if TRANS:  # (L^T)[rows, orows] = L[orows, rows]^T
                lt_ptrs = l_mat + orows[None, :] * stride_lr + rows[:, None] * stride_lc
            else:
                lt_ptrs = l_mat + rows[:, None] * stride_lr + orows[None, :] * stride_lc
            lmask = (rows[:, None] < n) & (orows[None, :] < n)
            lblk = tl.load(lt_ptrs, mask=lmask, other=0.0)
            xo = tl.load(
                x_mat + orows[:, None] * stride_xr + rhs[None, :] * stride_xc,
                mask=(orows[:, None] < n) & (rhs[None, :] < m),
                other=0.0,
            )
            acc -= tl.dot(lblk, xo, input_precision=PRECISION)
        d_base = dinv_ptr + b * stride_db + blk * stride_dk
        if TRANS:
            dinv = tl.load(d_base + idx[None, :] * BS + idx[:, None])
        else:
            dinv = tl.load(d_base + idx[:, None] * BS + idx[None, :])
        tl.store(x_ptrs, tl.dot(dinv, acc, input_precision=PRECISION), mask=xmask)
        tl.debug_barrier()  # later blocks of this program read what was just stored


def factor(a, dinv, info, *, precision, bs, bt, br, num_warps=4, num_stages=2):
    """In-place blocked Cholesky of the lower triangles of a [B, n, n] fp32 batch."""
    batch, n, _ = a.shape
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"bs must be a power of two >= 16, got {bs}")
    opts = {"PRECISION": precision, "BS": bs, "num_warps": num_warps, "num_stages": num_stages}
    d_strides = (dinv.stride(0), dinv.stride(1))
    for k0 in range(0, n, bs):
        factor_diag_kernel[(batch,)](
            a, dinv, info, n, k0, *a.stride(), *d_strides, LOG_BS=bs.bit_length() - 1, **opts
        )
        below = n - k0 - bs
        if below <= 0:
            break
        panel_kernel[(triton.cdiv(below, br), batch)](
            a, dinv, n, k0, *a.stride(), *d_strides, BR=br, **opts
        )
        tiles = triton.cdiv(below, bt)
        update_kernel[(tiles * (tiles + 1) // 2, batch)](a, n, k0, *a.stride(), BT=bt, **opts)


def solve(a, dinv, x, *, precision, bs, bm, num_warps=4, num_stages=2):
    """x <- (L L^T)^-1 x in place, for x [B, n, m] fp32."""
    batch, n, m = x.shape
    grid = (batch, triton.cdiv(m, bm))
    for trans in (False, True):
        solve_kernel[grid](
            a, dinv, x, n, m, *a.stride(), dinv.stride(0), dinv.stride(1), *x.stride(),
            TRANS=trans, PRECISION=precision, BS=bs, BM=bm,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip


def workspace(a, bs):
    """The dinv and info buffers `factor` fills for a [B, n, n] batch."""
    batch, n, _ = a.shape
    nblocks = triton.cdiv(n, bs)
    dinv = torch.empty(batch, nblocks, bs, bs, dtype=torch.float32, device=a.device)
    return dinv, torch.zeros(batch, dtype=torch.int32, device=a.device)
