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

Launches: 3 per block column + 2 per solve, issued asynchronously from a host loop. On CUDA the
loop is captured in a CUDA graph (`LaunchGraphs`, graph=True): the second call with the same
tensors (addresses, shapes, strides), tiles and stream captures it and every later one replays
it, so the whole factorisation is one graph launch. Why a graph and not a persistent kernel: each
step needs every program of the previous step finished; inside one launch that is a grid-wide
barrier, which is only safe when every program is resident at once (Triton does not guarantee
co-residency, and 1000 matrices x hundreds of tiles are not) and which deadlocks under the
interpreter (programs run one after another), so it could not be tested on a CPU. The graph keeps
the tested kernels and removes the per-launch host cost. The matrix stays in global memory/L2
between steps. Dots take PRECISION ("tf32x3" on GPU: fp32-level products on tensor cores).
n <= 128 (SMALL_N): small_kernel runs all of it in one program per matrix (grid (B,), 1 launch for
factor + solve of the whole batch; each block column's three steps and the two solves are
separated by barriers inside the program, the 64 KiB matrix stays in L1/L2), so many small
systems pay one launch instead of 3 per block column + 2. Its tiles: BS = 32 (n = 65 is three
block columns, each a 32-step register factorisation and tensor-core dots), BM = 16 right-hand
sides per pass (the smallest dot N; routers have about 8 experts), num_stages = 1 (every loop
reads what the previous barrier published: nothing to prefetch).
Tile shapes: BS = BT = 64 (32 for n <= 128), BR = 64 on GPU: the register factorisation of a
64 x 64 block is 64 short steps, and a 64-deep dot keeps the update on tensor cores while the
trailing tile grid still has hundreds of programs at n >= 1k; the interpreter tests use 16
through the same constexprs.
Only the lower triangle of the working matrix is read or written.
"""

import collections
import threading

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
def _factor_diag(a_mat, d_blk, n, k0, stride_ar, stride_ac, PRECISION: tl.constexpr,
                 BS: tl.constexpr, LOG_BS: tl.constexpr):  # fmt: skip
    """Factors the diagonal block at k0 in place, stores its inverse at d_blk ([BS, BS]);
    -> the first failed pivot's index in the block, BS if none failed."""
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
    tl.store(d_blk + idx[:, None] * BS + idx[None, :], inv)
    return tl.min(tl.where(failed, idx, BS), axis=0)


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
    d_blk = dinv_ptr + b * stride_db + (k0 // BS) * stride_dk
    fail = _factor_diag(
        a_ptr + b * stride_ab, d_blk, n, k0, stride_ar, stride_ac, PRECISION, BS, LOG_BS
    )
    old = tl.load(info_ptr + b)
    tl.store(info_ptr + b, tl.where((old == 0) & (fail < BS), k0 + fail + 1, old))


@triton.jit
def _panel_rows(a_mat, d_blk, n, k0, row0, stride_ar, stride_ac, PRECISION: tl.constexpr,
                BS: tl.constexpr, BR: tl.constexpr):  # fmt: skip
    """L21 = A21 L11^-T for the BR panel rows from row0 (below the diagonal block at k0)."""
    idx = tl.arange(0, BS)
    inv = tl.load(d_blk + idx[:, None] * BS + idx)
    prow = row0 + tl.arange(0, BR)
    c = (k0 + idx)[None, :]
    p_ptrs = a_mat + prow[:, None] * stride_ar + c * stride_ac
    pmask = (prow[:, None] < n) & (c < n)
    a21 = tl.load(p_ptrs, mask=pmask, other=0.0)
    tl.store(p_ptrs, tl.dot(a21, tl.trans(inv), input_precision=PRECISION), mask=pmask)


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
    d_blk = dinv_ptr + b * stride_db + (k0 // BS) * stride_dk
    row0 = k0 + BS + tl.program_id(0) * BR
    _panel_rows(a_ptr + b * stride_ab, d_blk, n, k0, row0, stride_ar, stride_ac, PRECISION, BS, BR)


@triton.jit
def _update_tile(a_mat, n, k0, ti, tj, stride_ar, stride_ac, PRECISION: tl.constexpr,
                 BS: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    """A22 -= L21 L21^T on the trailing lower tile (ti, tj) of the step at k0."""
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
    _update_tile(a_mat, n, k0, ti, tj, stride_ar, stride_ac, PRECISION, BS, BT)


@triton.jit
def _solve_rhs(
    l_mat, d_mat, x_mat, rhs, n, m, stride_lr, stride_lc, stride_dk, stride_xr, stride_xc,
    TRANS: tl.constexpr, PRECISION: tl.constexpr, BS: tl.constexpr,
):  # fmt: skip
    """Block substitution for the right-hand-side columns `rhs` of one matrix, in place:
    L Y = X (TRANS False) or L^T X = Y (TRANS True)."""
    idx = tl.arange(0, BS)
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
        d_base = d_mat + blk * stride_dk
        if TRANS:
            dinv = tl.load(d_base + idx[None, :] * BS + idx[:, None])
        else:
            dinv = tl.load(d_base + idx[:, None] * BS + idx[None, :])
        tl.store(x_ptrs, tl.dot(dinv, acc, input_precision=PRECISION), mask=xmask)
        tl.debug_barrier()  # later blocks of this program read what was just stored


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
    rhs = tl.program_id(1) * BM + tl.arange(0, BM)
    l_mat, d_mat, x_mat = l_ptr + b * stride_lb, dinv_ptr + b * stride_db, x_ptr + b * stride_xb
    _solve_rhs(l_mat, d_mat, x_mat, rhs, n, m, stride_lr, stride_lc, stride_dk, stride_xr,
               stride_xc, TRANS, PRECISION, BS)  # fmt: skip


@triton.jit
def small_kernel(
    a_ptr,  # [B, n, n] fp32, n <= 128: the lower triangle becomes L (when FACTOR)
    dinv_ptr,  # [B, nblocks, BS, BS]
    info_ptr,  # [B] int32 out (when FACTOR): 0, or 1 + the first failed pivot's column
    x_ptr,  # [B, n, m] fp32: right-hand sides in, solution out
    n,
    m,
    stride_ab,
    stride_ar,
    stride_ac,
    stride_db,
    stride_dk,
    stride_xb,
    stride_xr,
    stride_xc,
    FACTOR: tl.constexpr,  # False: solve with a factor this kernel stored before
    PRECISION: tl.constexpr,
    BS: tl.constexpr,
    LOG_BS: tl.constexpr,
    BR: tl.constexpr,
    BM: tl.constexpr,
):
    """One program per matrix: the whole blocked factorisation (the three steps above, each
    followed by a barrier, the matrix in L1/L2) and both triangular solves, in one launch."""
    b = tl.program_id(0).to(tl.int64)
    a_mat = a_ptr + b * stride_ab
    d_mat = dinv_ptr + b * stride_db
    x_mat = x_ptr + b * stride_xb
    if FACTOR:
        info = 0
        for k0 in range(0, n, BS):
            d_blk = d_mat + (k0 // BS) * stride_dk
            fail = _factor_diag(a_mat, d_blk, n, k0, stride_ar, stride_ac, PRECISION, BS, LOG_BS)
            info = tl.where((info == 0) & (fail < BS), k0 + fail + 1, info)
            tl.debug_barrier()
            for row0 in range(k0 + BS, n, BR):
                _panel_rows(a_mat, d_blk, n, k0, row0, stride_ar, stride_ac, PRECISION, BS, BR)
            tl.debug_barrier()
            for ti in range(0, tl.cdiv(n - k0 - BS, BS)):
                for tj in range(0, ti + 1):
                    _update_tile(a_mat, n, k0, ti, tj, stride_ar, stride_ac, PRECISION, BS, BS)
            tl.debug_barrier()
        tl.store(info_ptr + b, info)
    for r0 in range(0, m, BM):
        rhs = r0 + tl.arange(0, BM)
        for trans in tl.static_range(2):
            _solve_rhs(a_mat, d_mat, x_mat, rhs, n, m, stride_ar, stride_ac, stride_dk,
                       stride_xr, stride_xc, trans == 1, PRECISION, BS)  # fmt: skip


class LaunchGraphs:
    """CUDA graphs of fixed launch sequences, keyed by everything the launches encode (tensor
    addresses, shapes, strides, dtypes, tile sizes, stream): a key seen once runs eagerly, the
    second time it is captured and replayed, later replays only. Same key = the very same kernel
    arguments, so a replay is exactly the eager launches. Least recently used keys are dropped
    beyond `size`. Inside someone else's capture the launches run eagerly (into that graph)."""

    def __init__(self, api=torch.cuda, size=16):
        self.api, self.size = api, size
        self.graphs, self.seen = collections.OrderedDict(), collections.OrderedDict()
        self.lock = threading.Lock()
        self.stats = collections.Counter()  # eager / captured / replayed / capture_failed

    def run(self, key, launch):
        if self.api.is_current_stream_capturing():
            return launch()
        key = (*key, self.api.current_stream().cuda_stream)
        with self.lock:
            graph = self.graphs.get(key)
            if graph is None and self.seen.get(key) is None:
                self._remember(self.seen, key, "eager")
                self.stats["eager"] += 1
                return launch()  # first sight: eager (and Triton compiles outside any capture)
            if graph is None and self.seen[key] == "failed":
                self.stats["eager"] += 1
                return launch()
            if graph is None:
                graph = self.api.CUDAGraph()
                try:
                    with self.api.graph(graph):
                        launch()
                except RuntimeError:  # not capturable here: stay eager for this key
                    self.seen[key] = "failed"
                    self.stats["capture_failed"] += 1
                    return launch()
                self._remember(self.graphs, key, graph)
                self.stats["captured"] += 1
            self.graphs.move_to_end(key)
            self.stats["replayed"] += 1
        graph.replay()

    def _remember(self, table, key, value):
        table[key] = value
        while len(table) > self.size:
            table.popitem(last=False)


GRAPHS = LaunchGraphs()


def _key(name, tensors, **params):
    meta = tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in tensors)
    return (name, meta, tuple(sorted(params.items())))


def factor(a, dinv, info, *, precision, bs, bt, br, num_warps=4, num_stages=2, graph=False):
    """In-place blocked Cholesky of the lower triangles of a [B, n, n] fp32 batch; graph=True
    (CUDA only) runs the launches through GRAPHS."""
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"bs must be a power of two >= 16, got {bs}")
    opts = {"PRECISION": precision, "BS": bs, "num_warps": num_warps, "num_stages": num_stages}
    launch = lambda: _factor_launches(a, dinv, info, bt, br, opts)  # noqa: E731
    if not graph:
        return launch()
    GRAPHS.run(_key("factor", (a, dinv, info), bt=bt, br=br, **opts), launch)


def _factor_launches(a, dinv, info, bt, br, opts):
    batch, n, _ = a.shape
    bs = opts["BS"]
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


def solve(a, dinv, x, *, precision, bs, bm, num_warps=4, num_stages=2, graph=False):
    """x <- (L L^T)^-1 x in place, for x [B, n, m] fp32; graph as in `factor`."""
    opts = {"PRECISION": precision, "BS": bs, "BM": bm, "num_warps": num_warps,
            "num_stages": num_stages}  # fmt: skip
    launch = lambda: _solve_launches(a, dinv, x, opts)  # noqa: E731
    if not graph:
        return launch()
    GRAPHS.run(_key("solve", (a, dinv, x), **opts), launch)


def _solve_launches(a, dinv, x, opts):
    batch, n, m = x.shape
    grid = (batch, triton.cdiv(m, opts["BM"]))
    for trans in (False, True):
        solve_kernel[grid](
            a, dinv, x, n, m, *a.stride(), dinv.stride(0), dinv.stride(1), *x.stride(),
            TRANS=trans, **opts,
        )  # fmt: skip


SMALL_N = 128  # small_kernel's limit: a 128 x 128 fp32 matrix (64 KiB) stays in L1/L2


def small(a, dinv, info, x, *, factor, precision, bs, br, bm, num_warps=4):
    """One launch for the whole batch: factor a (when `factor`) and x <- (L L^T)^-1 x."""
    batch, n, m = x.shape
    if n > SMALL_N:
        raise ValueError(f"small: n must be <= {SMALL_N}, got {n}")
    small_kernel[(batch,)](
        a, dinv, info, x, n, m, *a.stride(), dinv.stride(0), dinv.stride(1), *x.stride(),
        FACTOR=factor, PRECISION=precision, BS=bs, LOG_BS=bs.bit_length() - 1, BR=br, BM=bm,
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip


def workspace(a, bs):
    """The dinv and info buffers `factor` fills for a [B, n, n] batch."""
    batch, n, _ = a.shape
    nblocks = triton.cdiv(n, bs)
    dinv = torch.empty(batch, nblocks, bs, bs, dtype=torch.float32, device=a.device)
    return dinv, torch.zeros(batch, dtype=torch.int32, device=a.device)
