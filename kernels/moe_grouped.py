"""Grouped expert GEMMs over the block-aligned dispatch of moe_align, and the k-reduction.

  gemm1:  h[p] = silu(x[tok(p)] @ Wg[e]^T) * (x[tok(p)] @ Wu[e]^T)   p = sorted position, e = the
          expert of p's block; x rows are gathered by index (no permuted copy of x).
  gemm2:  y[slot(p)] = w[slot(p)] * (h[p] @ Wd[e]^T)                  routing weight in the epilogue
  reduce: out[t] = sum_{j < k} y[t*k + j] in the fixed order j = 0..k-1 (no atomics), so results
          are deterministic and a token's output does not depend on the rest of the batch.
          With k = 1 (and no split-K), gemm2 writes out directly and there is no reduce.

Grids: gemm1 (blocks, cdiv(I, BLOCK_N)), gemm2 (blocks, cdiv(H, BLOCK_N), SPLIT_K), reduce
(cdiv(T, 16), cdiv(H, 128)). Launches per forward: routing 1-2 (kernels/moe_routing.py), gemm1,
gemm2, and the reduce when k > 1 or SPLIT_K > 1: 4-5 in all, none waiting on the host.

Tiles (the configs live as data in fastdume/ops/moe_configs): BLOCK_M 16-128 rows of one
expert (decode batches are tiny, so a small M wastes less on padding), BLOCK_N 64-128 and BLOCK_K
64 so that gemm1's three tiles (x, gate, up) per pipeline stage stay below ~48 KiB in bf16 and
3-4 stages fit the 163 KiB (sm_80) / 227 KiB (sm_90) shared memory. Accumulation is fp32.
UPCAST (interpreter only) turns bf16/fp16 tiles into fp32 because the interpreter's tl.dot
has no bf16.

Design options, each a config key (defaults = the plain design above):
- SWAP_AB (per GEMM): compute (W x^T) as [BLOCK_N, BLOCK_M] instead of x W^T. An MMA's M side
  must be 64 rows per warpgroup for wgmma on sm_90; with BLOCK_M < 64 the token side cannot fill
  it, the weight side (BLOCK_N >= 64) can, so decode tiles get wgmma instead of mma.sync. Same
  loads, the epilogue stores the transposed tile.
- SPLIT_K (gemm2): at small T the down projection has only cdiv(H, BLOCK_N) programs per used
  block, each streaming an I-long weight row; SPLIT_K programs each take I / SPLIT_K of it and
  store fp32 partials [SPLIT_K, T*k, H]; the reduce sums them (and the k slots) in the fixed
  order j = 0..k-1, split = 0..SPLIT_K-1. Deterministic, no atomics; one more launch at k = 1.
- FUSED_ROUTING: see kernels/moe_routing.py (routing and alignment in one launch).
"""

import torch
import triton
import triton.language as tl
from fastdume.kernels.moe_align import align, slot_row_offset
from fastdume.kernels.moe_routing import route, route_align


@triton.jit
def _rows_and_cols(sorted_ptr, S, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's sorted positions, their slots and validity, its output columns and their
    bound. Called only for a used block: an unused one may lie past the end of sorted_ptr."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ptr + pos)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pos, slots, slots < S, cols, cols < n_cols


@triton.jit
def _weight_tile(w_ptrs, k_ok, col_ok, SWAP_AB: tl.constexpr):
    """A weight tile: [BLOCK_N, BLOCK_K] under SWAP_AB, else [BLOCK_K, BLOCK_N]."""
    if SWAP_AB:
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    else:
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    return w


@triton.jit
def _weight_ptrs(base, cols, ks, row_len, SWAP_AB: tl.constexpr):
    """Pointers of a weight tile whose rows (output columns) are row_len long."""
    if SWAP_AB:
        ptrs = base + cols[:, None] * row_len + ks[None, :]
    else:
        ptrs = base + cols[None, :] * row_len + ks[:, None]
    return ptrs


@triton.jit
def _mma(a, w, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SWAP_AB: tl.constexpr):
    """acc + a @ w ([M, N]), or under SWAP_AB acc + w @ a^T ([N, M])."""
    if UPCAST:
        a, w = a.to(tl.float32), w.to(tl.float32)
    if SWAP_AB:
        acc = tl.dot(w, tl.trans(a), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _store_tile(ptr, row_off, cols, tile, row_ok, col_ok, SWAP_AB: tl.constexpr):
    """Stores a [rows, cols] result, given as [cols, rows] under SWAP_AB."""
    if SWAP_AB:
        mask = col_ok[:, None] & row_ok[None, :]
        tl.store(ptr + row_off[None, :] + cols[:, None], tile.to(ptr.dtype.element_ty), mask=mask)
    else:
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(ptr + row_off[:, None] + cols[None, :], tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def moe_gemm1_kernel(
    x_ptr,  # [T, H], row stride stride_xt
    w_ptr,  # [E, 2I, H], gate rows first, then up rows; contiguous
    h_ptr,  # [P, inter] out, P = padded sorted positions
    sorted_ptr,  # [P] int32 slot ids, sentinel S for padding
    block_expert_ptr,  # [P / BLOCK_M] int32, -1 = unused block
    S,
    H,
    inter,
    stride_xt,
    stride_we,  # 2I*H and I*H passed from the host: Python ints, so i64 when they need it
    up_offset,
    TOP_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    if e < 0:
        return
    pos, slots, valid, cols, col_ok = _rows_and_cols(sorted_ptr, S, inter, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = x_ptr + slot_row_offset(slots, TOP_K, stride_xt)[:, None] + ks[None, :]
    g_ptrs = _weight_ptrs(w_ptr + e * stride_we, cols, ks, H, SWAP_AB)
    u_ptrs = g_ptrs + up_offset
    if SWAP_AB:
        acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros_like(acc_g)
    for k0 in range(0, H, BLOCK_K):
        k_ok = ks < H - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        g = _weight_tile(g_ptrs, k_ok, col_ok, SWAP_AB)
        u = _weight_tile(u_ptrs, k_ok, col_ok, SWAP_AB)
        acc_g = _mma(a, g, acc_g, UPCAST, PRECISION, SWAP_AB)
        acc_u = _mma(a, u, acc_u, UPCAST, PRECISION, SWAP_AB)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K

    h = acc_g * tl.sigmoid(acc_g) * acc_u
    _store_tile(h_ptr, pos * inter, cols, h, valid, col_ok, SWAP_AB)


@triton.jit
def moe_gemm2_kernel(
    h_ptr,  # [P, inter] from gemm1
    w_ptr,  # [E, H, inter] down_proj, contiguous
    y_ptr,  # [SPLIT_K, S, H] out, row = slot (= token when k = 1 and no split)
    sorted_ptr,
    block_expert_ptr,
    topk_w_ptr,  # [S] routing weight per slot
    S,
    H,
    inter,
    stride_we,  # H*inter
    k_per_split,  # inter rounded up to BLOCK_K without split-K; a multiple of BLOCK_K
    stride_ys,  # S*H: one split's partials
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    if e < 0:
        return
    pos, slots, valid, cols, col_ok = _rows_and_cols(sorted_ptr, S, H, BLOCK_M, BLOCK_N)
    split = tl.program_id(2)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, inter)
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = h_ptr + pos[:, None] * inter + (k_lo + ks)[None, :]
    b_ptrs = _weight_ptrs(w_ptr + e * stride_we, cols, k_lo + ks, inter, SWAP_AB)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = ks < k_hi - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = _weight_tile(b_ptrs, k_ok, col_ok, SWAP_AB)
        acc = _mma(a, b, acc, UPCAST, PRECISION, SWAP_AB)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    weight = tl.load(topk_w_ptr + slots, mask=valid, other=0.0).to(tl.float32)
    if SWAP_AB:
        acc *= weight[None, :]
    else:
        acc *= weight[:, None]
    y_split = y_ptr + split.to(tl.int64) * stride_ys
    _store_tile(y_split, slot_row_offset(slots, 1, H), cols, acc, valid, col_ok, SWAP_AB)


@triton.jit
def moe_reduce_kernel(
    y_ptr,  # [SPLIT_K, T*k, H] fp32
    out_ptr,  # [T, H]
    T,
    H,
    stride_ys,
    TOP_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < T)[:, None] & (cols < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        for split in tl.static_range(SPLIT_K):
            offs = split * stride_ys + (rows * TOP_K + j)[:, None] * H + cols[None, :]
            acc += tl.load(y_ptr + offs, mask=mask)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], out, mask=mask)


def _dot_options(dtype, interpreted):
    upcast = interpreted and dtype in (torch.bfloat16, torch.float16)
    return {"UPCAST": upcast, "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def split_plan(inter, block_k, split_k):
    """(k_per_split, number of non-empty splits): splits start on BLOCK_K boundaries."""
    per = triton.cdiv(triton.cdiv(inter, split_k), block_k) * block_k
    return per, triton.cdiv(inter, per)


def experts_forward(
    hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj, config, aligned=None
):
    """sum_j w_j * down_j(silu(gate_j x) * up_j x) over the routed experts -> [T, H].

    config: a complete config (fastdume.ops.moe_configs.validate fills the defaults); aligned:
    (sorted_slots, block_expert) from moe_routing.route_align, or None to align here."""
    num_tokens, hidden = hidden_states.shape
    top_k = topk_ids.shape[1]
    num_experts, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    num_slots = num_tokens * top_k
    dtype, device = hidden_states.dtype, hidden_states.device
    block_m = config["BLOCK_M"]
    dots = _dot_options(dtype, device.type != "cuda")

    if aligned is None:
        aligned = align(topk_ids, num_experts, block_m)
    sorted_slots, block_expert = aligned
    h = torch.empty(sorted_slots.numel(), inter, device=device, dtype=dtype)
    c1 = config["gemm1"]
    grid1 = (block_expert.numel(), triton.cdiv(inter, c1["BLOCK_N"]))
    moe_gemm1_kernel[grid1](
        hidden_states, gate_up_proj, h, sorted_slots, block_expert,
        num_slots, hidden, inter, hidden_states.stride(0), gate_up_proj.stride(0), inter * hidden,
        TOP_K=top_k, BLOCK_M=block_m, **dots, **c1,
    )  # fmt: skip

    c2 = {k: v for k, v in config["gemm2"].items() if k != "SPLIT_K"}
    per_split, splits = split_plan(inter, c2["BLOCK_K"], config["gemm2"]["SPLIT_K"])
    out = torch.empty(num_tokens, hidden, device=device, dtype=dtype)
    direct = top_k == 1 and splits == 1
    y_shape = (splits, num_slots, hidden)
    y = out if direct else torch.empty(y_shape, device=device, dtype=torch.float32)
    grid2 = (block_expert.numel(), triton.cdiv(hidden, c2["BLOCK_N"]), splits)
    moe_gemm2_kernel[grid2](
        h, down_proj, y, sorted_slots, block_expert, topk_weights.float().contiguous(),
        num_slots, hidden, inter, down_proj.stride(0), per_split, num_slots * hidden,
        BLOCK_M=block_m, **dots, **c2,
    )  # fmt: skip
    if not direct:
        grid3 = (triton.cdiv(num_tokens, 16), triton.cdiv(hidden, 128))
        moe_reduce_kernel[grid3](
            y, out, num_tokens, hidden, num_slots * hidden,
            TOP_K=top_k, SPLIT_K=splits, BLOCK_T=16, BLOCK_H=128,
        )  # fmt: skip
    return out


def dispatch(hidden_states, router_weight, router_bias, top_k, temperature, config):
    """Routing as `config` asks -> (topk_weights, topk_ids, aligned or None): with FUSED_ROUTING
    one launch also aligns for config's BLOCK_M, else experts_forward aligns (a second launch)."""
    if config["FUSED_ROUTING"]:
        weights, ids, *aligned = route_align(
            hidden_states, router_weight, router_bias, top_k, temperature, config["BLOCK_M"]
        )
        return weights, ids, tuple(aligned)
    return (*route(hidden_states, router_weight, router_bias, top_k, temperature), None)


def forward(hidden_states, router_weight, router_bias, gate_up_proj, down_proj, top_k,
            temperature, config):  # fmt: skip
    """The whole Triton MoE forward (no autograd): what the tuners time."""
    weights, ids, aligned = dispatch(
        hidden_states, router_weight, router_bias, top_k, temperature, config
    )
    return experts_forward(hidden_states, weights, ids, gate_up_proj, down_proj, config, aligned)
