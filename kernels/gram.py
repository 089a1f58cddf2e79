"""SYRK-style Gram accumulation: G[l] += X[l]^T X[l] (lower triangle only), s[l] += sum(X[l]), n.

One launch serves every layer: grid = (lower-triangle tiles, K splits, layers). Each program owns
one BLOCK_H x BLOCK_H tile (i, j) with i >= j of one layer's Gram matrix and streams the tokens of
its K split through it, accumulating in fp32 registers; the tile is then added straight into the
stored statistics (fp32 or fp64), only where row >= col, so the upper triangle is never touched.

Tile shapes: BLOCK_H = 128 makes each [BLOCK_N, 128] operand load feed 128 x 128 x BLOCK_N MACs
(arithmetic intensity 64 per loaded element, well above the H100's ~266 flop/byte ridge for bf16
once both operands stream through shared memory); BLOCK_N = 64 for 16-bit inputs and 32 for fp32
keeps two operands x 3 pipeline stages at 96 KiB of shared memory on sm_80 and sm_90 alike.
Interpreter tests shrink both to 16 through the same constexprs.

Schedule options (the defaults are the design above; benches/tune_ridge.py searches them):
- Larger tiles: BLOCK_N = 128 tokens per pipeline stage (twice the MMA depth per load, fewer loop
  trips); 3 stages of two 128 x 128 bf16 operands (192 KiB) fit sm_90 only, 2 stages fit sm_80.
  (BLOCK_H = 256 does not fit: its 256 x 256 fp32 tile needs 256 KiB of shared memory in the
  epilogue's layout conversion, above both cards, tests/test_ridge_aot.py.)
- GROUP_H > 0, grouped tile order: the grid covers the full square of tiles, consecutive programs
  walk down GROUP_H-row groups column by column (as grouped GEMMs do), so programs running
  together share column blocks of X in L2; the programs above the diagonal return at once.
- Split over the token axis (split_k > 1), two reductions: ATOMIC adds each split's tile into the
  statistics (order-free, not bitwise reproducible), or PARTIAL stores each split's fp32 tile in a
  workspace [splits, L, H, H] and gram_reduce_kernel (grid: lower tiles x layers) adds them in split
  order 0, 1, ...: deterministic, one extra launch and splits * L * H^2 * 4 bytes of workspace.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def lower_tile_coords(pid):
    # Linear index -> (i, j), i >= j, row-major over the lower triangle; the float guess is
    # corrected in integers so it is exact for any realistic tile count.
    i = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
    return i, pid - i * (i + 1) // 2


@triton.jit
def grouped_tile_coords(pid, tiles, GROUP_H: tl.constexpr):
    """Linear index over the full tiles x tiles square -> (i, j), GROUP_H-row groups walked
    column by column (the caller skips i < j)."""
    per_group = GROUP_H * tiles
    first = (pid // per_group) * GROUP_H
    size = tl.minimum(tiles - first, GROUP_H)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def _cast(x, NAME: tl.constexpr):
    # dtypes travel as strings so that launch configs are plain data (JSON for AOT compiles)
    if NAME == "bf16":
        return x.to(tl.bfloat16)
    elif NAME == "fp16":
        return x.to(tl.float16)
    else:
        return x.to(tl.float32)


@triton.jit
def _load_t(x_layer, mask_ptr, rows, n0, n_stop, H, stride_xn, stride_xh, HAS_MASK, BLOCK_N):
    """X[n0:n0+BLOCK_N, rows]^T as [BLOCK_H, BLOCK_N] and the kept-token flags; masked tokens
    are zero here, which removes them from every product (only this operand needs it) and sum."""
    toks = n0 + tl.arange(0, BLOCK_N)
    keep = toks < n_stop
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + toks, mask=toks < n_stop, other=0) != 0)
    a = tl.load(
        x_layer + rows[:, None] * stride_xh + toks.to(tl.int64)[None, :] * stride_xn,
        mask=(rows[:, None] < H) & keep[None, :],
        other=0.0,
    )
    return a, keep


@triton.jit
def gram_kernel(
    x_ptr,  # [L, N, H] any strides, fp32 / bf16 / fp16
    mask_ptr,  # [N] int8 (0 = skip token), read only when HAS_MASK
    gram_ptr,  # [L, H, H] fp32 or fp64, lower triangle updated in place
    colsum_ptr,  # [L, H] same dtype as gram
    count_ptr,  # [1] int32 token counter (layer 0, tile (0, 0) adds to it)
    part_ptr,  # [splits, L, H, H] fp32 partial tiles, written only when PARTIAL
    psum_ptr,  # [splits, L, H] fp32 partial column sums, written only when PARTIAL
    N,
    H,
    tokens_per_split,
    stride_xl,
    stride_xn,
    stride_xh,
    stride_gl,
    stride_gr,
    stride_gc,
    stride_sl,
    HAS_MASK: tl.constexpr,
    ATOMIC: tl.constexpr,  # several K splits add into the same tile
    PARTIAL: tl.constexpr,  # several K splits store partials for gram_reduce_kernel instead
    ROUND_DTYPE: tl.constexpr,  # "fp32" / "bf16" / "fp16": the products' inputs are rounded to it
    DOT_DTYPE: tl.constexpr,  # dtype fed to tl.dot: ROUND_DTYPE, or "fp32" under the interpreter
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands: ieee / tf32 / tf32x3
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_H: tl.constexpr,  # 0: row-major lower-triangle grid; > 0: grouped square grid
):
    if GROUP_H > 0:
        ti, tj = grouped_tile_coords(tl.program_id(0), tl.cdiv(H, BLOCK_H), GROUP_H)
        if ti < tj:
            return
    else:
        ti, tj = lower_tile_coords(tl.program_id(0))
    split = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)

    rows = ti * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tj * BLOCK_H + tl.arange(0, BLOCK_H)
    x_layer = x_ptr + layer * stride_xl
    n_start = split * tokens_per_split
    n_stop = tl.minimum(n_start + tokens_per_split, N)

    # Tensor cores truncate when they add products into their accumulator, a bias that grows
    # with the number of MMA steps (3e-4 relative at 64k tokens on an H200); restarting the MMA
    # accumulator every CHUNK_N tokens and summing the chunks with rounded fp32 adds keeps it
    # to one chunk's worth.
    CHUNK_N: tl.constexpr = 32 * BLOCK_N
    acc = tl.zeros((BLOCK_H, BLOCK_H), dtype=tl.float32)
    for c0 in range(n_start, n_stop, CHUNK_N):
        part = tl.zeros((BLOCK_H, BLOCK_H), dtype=tl.float32)
        for n0 in range(c0, tl.minimum(c0 + CHUNK_N, n_stop), BLOCK_N):
            a, _ = _load_t(
                x_layer, mask_ptr, rows, n0, n_stop, H, stride_xn, stride_xh, HAS_MASK, BLOCK_N
            )
            toks = n0 + tl.arange(0, BLOCK_N)
            b = tl.load(
                x_layer + toks.to(tl.int64)[:, None] * stride_xn + cols[None, :] * stride_xh,
                mask=(toks[:, None] < n_stop) & (cols[None, :] < H),
                other=0.0,
            )
            a = _cast(_cast(a, ROUND_DTYPE), DOT_DTYPE)
            b = _cast(_cast(b, ROUND_DTYPE), DOT_DTYPE)
            part = tl.dot(a, b, part, input_precision=PRECISION)
        acc += part

    out_dtype = gram_ptr.dtype.element_ty
    g_ptrs = gram_ptr + layer * stride_gl + rows[:, None] * stride_gr + cols[None, :] * stride_gc
    lower = (rows[:, None] < H) & (cols[None, :] < H) & (rows[:, None] >= cols[None, :])
    part_layer = (split.to(tl.int64) * tl.num_programs(2) + layer) * H
    if PARTIAL:
        tl.store(part_ptr + (part_layer + rows[:, None]) * H + cols[None, :], acc, mask=lower)
    elif ATOMIC:
        tl.atomic_add(g_ptrs, acc.to(out_dtype), mask=lower)
    else:
        g = tl.load(g_ptrs, mask=lower)
        tl.store(g_ptrs, g + acc.to(out_dtype), mask=lower)

    if ti == tj:
        # Diagonal tiles own their rows' column sums (tile (0, 0) of layer 0 also the token
        # count): a second pass over one [BLOCK_H, N] strip, about 1/(tiles per row) extra
        # traffic, keeps the main loop a pure dot pipeline.
        csum = tl.zeros((BLOCK_H,), dtype=tl.float32)
        count = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for n0 in range(n_start, n_stop, BLOCK_N):
            a, keep = _load_t(
                x_layer, mask_ptr, rows, n0, n_stop, H, stride_xn, stride_xh, HAS_MASK, BLOCK_N
            )
            csum += tl.sum(a.to(tl.float32), axis=1)
            count += keep.to(tl.int32)
        s_ptrs = colsum_ptr + layer * stride_sl + rows
        if PARTIAL:
            tl.store(psum_ptr + part_layer + rows, csum, mask=rows < H)
        elif ATOMIC:
            tl.atomic_add(s_ptrs, csum.to(out_dtype), mask=rows < H)
        else:
            s = tl.load(s_ptrs, mask=rows < H)
            tl.store(s_ptrs, s + csum.to(out_dtype), mask=rows < H)
        if (ti == 0) & (layer == 0):
            tl.atomic_add(count_ptr, tl.sum(count, axis=0))


@triton.jit
def gram_reduce_kernel(
    part_ptr,  # [splits, L, H, H] fp32 from gram_kernel (PARTIAL)
    psum_ptr,  # [splits, L, H] fp32
    gram_ptr,
    colsum_ptr,
    H,
    splits,
    stride_gl,
    stride_gr,
    stride_gc,
    stride_sl,
    BLOCK_H: tl.constexpr,
):
    """Adds the splits' partial tiles (and diagonal tiles' column sums) in split order."""
    ti, tj = lower_tile_coords(tl.program_id(0))
    layer = tl.program_id(1).to(tl.int64)
    layers = tl.num_programs(1)
    rows = ti * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tj * BLOCK_H + tl.arange(0, BLOCK_H)
    lower = (rows[:, None] < H) & (cols[None, :] < H) & (rows[:, None] >= cols[None, :])
    acc = tl.zeros((BLOCK_H, BLOCK_H), dtype=tl.float32)
    csum = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for s in range(splits):
        base = (s * layers + layer) * H
        acc += tl.load(part_ptr + (base + rows[:, None]) * H + cols[None, :], mask=lower, other=0.0)
        if ti == tj:
            csum += tl.load(psum_ptr + base + rows, mask=rows < H, other=0.0)
    out_dtype = gram_ptr.dtype.element_ty
    g_ptrs = gram_ptr + layer * stride_gl + rows[:, None] * stride_gr + cols[None, :] * stride_gc
    tl.store(g_ptrs, tl.load(g_ptrs, mask=lower) + acc.to(out_dtype), mask=lower)
    if ti == tj:
        s_ptrs = colsum_ptr + layer * stride_sl + rows
        tl.store(s_ptrs, tl.load(s_ptrs, mask=rows < H) + csum.to(out_dtype), mask=rows < H)


def launch(
    x,
    gram,
    colsum,
    mask,
    *,
    round_dtype,
    dot_dtype,
    precision,
    block_h,
    block_n,
    split_k,
    num_warps=8,
    num_stages=3,
    group_h=0,
    ordered_split=False,
):
    """x [L, N, H], gram [L, H, H], colsum [L, H], mask [N] int8 or None; returns the token
    count as a 1-element int32 tensor (no host sync here). Launches: 1, or 2 with ordered_split
    and more than one split (see the module docstring for group_h and ordered_split)."""
    layers, n_tok, hidden = x.shape
    tiles_1d = triton.cdiv(hidden, block_h)
    per_split = triton.cdiv(triton.cdiv(n_tok, split_k), block_n) * block_n
    splits = max(1, triton.cdiv(n_tok, per_split))
    partial = ordered_split and splits > 1
    count = torch.zeros(1, dtype=torch.int32, device=x.device)
    part = psum = count  # dummies unless partial
    if partial:
        part = torch.empty(splits, layers, hidden, hidden, dtype=torch.float32, device=x.device)
        psum = torch.empty(splits, layers, hidden, dtype=torch.float32, device=x.device)
    lower_tiles = tiles_1d * (tiles_1d + 1) // 2
    grid = (tiles_1d * tiles_1d if group_h else lower_tiles, splits, layers)
    gram_kernel[grid](
        x,
        mask if mask is not None else count,
        gram,
        colsum,
        count,
        part,
        psum,
        n_tok,
        hidden,
        per_split,
        *x.stride(),
        *gram.stride(),
        colsum.stride(0),
        HAS_MASK=mask is not None,
        ATOMIC=splits > 1 and not partial,
        PARTIAL=partial,
        ROUND_DTYPE=round_dtype,
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        GROUP_H=group_h,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if partial:
        gram_reduce_kernel[(lower_tiles, layers)](
            part, psum, gram, colsum, hidden, splits, *gram.stride(), colsum.stride(0),
            BLOCK_H=block_h, num_warps=num_warps,
        )  # fmt: skip
    return count
