"""Grouped expert GEMMs over the block-aligned dispatch of moe_align, and the k-reduction.

  gemm1:  h[p] = silu(x[tok(p)] @ Wg[e]^T) * (x[tok(p)] @ Wu[e]^T)   p = sorted position, e = the
          expert of p's block; x rows are gathered by index (no permuted copy of x).
  gemm2:  y[slot(p)] = w[slot(p)] * (h[p] @ Wd[e]^T)                  routing weight in the epilogue
  reduce: out[t] = sum_{j < k} y[t*k + j] in the fixed order j = 0..k-1 (no atomics), so results
          are deterministic and a token's output does not depend on the rest of the batch.
          With k = 1, gemm2 writes out directly and there is no reduce.

Tiles (the configs live as data in fastdume/ops/moe_configs): BLOCK_M 16-128 rows of one
expert (decode batches are tiny, so a small M wastes less on padding), BLOCK_N 64-128 and BLOCK_K
64 so that gemm1's three tiles (x, gate, up) per pipeline stage stay below ~48 KiB in bf16 and
3-4 stages fit the 163 KiB (sm_80) / 227 KiB (sm_90) shared memory. Accumulation is fp32.
UPCAST (interpreter only) turns bf16/fp16 tiles into fp32 because the interpreter's tl.dot
has no bf16.
"""

import torch
import triton
import triton.language as tl
from fastdume.kernels.moe_align import align, padded_size, slot_row_offset


@triton.jit
def _rows_and_cols(sorted_ptr, S, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's sorted positions, their slots and validity, its output columns and their
    bound. Called only for a used block: an unused one may lie past the end of sorted_ptr."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ptr + pos)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pos, slots, slots < S, cols, cols < n_cols


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
    g_ptrs = w_ptr + e * stride_we + cols[None, :] * H + ks[:, None]
    u_ptrs = g_ptrs + up_offset
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = ks < H - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K

    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(
        h_ptr + pos[:, None] * inter + cols[None, :],
        h.to(h_ptr.dtype.element_ty),
        mask=valid[:, None] & col_ok[None, :],
    )


@triton.jit
def moe_gemm2_kernel(
    h_ptr,  # [P, inter] from gemm1
    w_ptr,  # [E, H, inter] down_proj, contiguous
    y_ptr,  # [S, H] out, row = slot (= token when k = 1)
    sorted_ptr,
    block_expert_ptr,
    topk_w_ptr,  # [S] routing weight per slot
    S,
    H,
    inter,
    stride_we,  # H*inter
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    if e < 0:
        return
    pos, slots, valid, cols, col_ok = _rows_and_cols(sorted_ptr, S, H, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = h_ptr + pos[:, None] * inter + ks[None, :]
    b_ptrs = w_ptr + e * stride_we + cols[None, :] * inter + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = ks < inter - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    acc *= tl.load(topk_w_ptr + slots, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(
        y_ptr + slot_row_offset(slots, 1, H)[:, None] + cols[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=valid[:, None] & col_ok[None, :],
    )


@triton.jit
def moe_reduce_kernel(
    y_ptr,  # [T*k, H] fp32
    out_ptr,  # [T, H]
    T,
    H,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < T)[:, None] & (cols < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (rows * TOP_K + j)[:, None] * H + cols[None, :], mask=mask)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], out, mask=mask)


def _dot_options(dtype, interpreted):
    upcast = interpreted and dtype in (torch.bfloat16, torch.float16)
    return {"UPCAST": upcast, "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def experts_forward(hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj, config):
    """sum_j w_j * down_j(silu(gate_j x) * up_j x) over the routed experts -> [T, H]."""
    num_tokens, hidden = hidden_states.shape
    top_k = topk_ids.shape[1]
    num_experts, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    num_slots = num_tokens * top_k
    dtype, device = hidden_states.dtype, hidden_states.device
    block_m = config["BLOCK_M"]
    dots = _dot_options(dtype, device.type != "cuda")

    sorted_slots, block_expert = align(topk_ids, num_experts, block_m)
    positions = padded_size(num_slots, num_experts, block_m)
    h = torch.empty(positions, inter, device=device, dtype=dtype)
    c1 = config["gemm1"]
    grid1 = (block_expert.numel(), triton.cdiv(inter, c1["BLOCK_N"]))
    moe_gemm1_kernel[grid1](
        hidden_states, gate_up_proj, h, sorted_slots, block_expert,
        num_slots, hidden, inter, hidden_states.stride(0), gate_up_proj.stride(0), inter * hidden,
        TOP_K=top_k, BLOCK_M=block_m, **dots, **c1,
    )  # fmt: skip

    out = torch.empty(num_tokens, hidden, device=device, dtype=dtype)
    y = out if top_k == 1 else torch.empty(num_slots, hidden, device=device, dtype=torch.float32)
    c2 = config["gemm2"]
    grid2 = (block_expert.numel(), triton.cdiv(hidden, c2["BLOCK_N"]))
    moe_gemm2_kernel[grid2](
        h, down_proj, y, sorted_slots, block_expert, topk_weights.float().contiguous(),
        num_slots, hidden, inter, down_proj.stride(0),
        BLOCK_M=block_m, **dots, **c2,
    )  # fmt: skip
    if top_k > 1:
        grid3 = (triton.cdiv(num_tokens, 16), triton.cdiv(hidden, 128))
        moe_reduce_kernel[grid3](y, out, num_tokens, hidden, TOP_K=top_k, BLOCK_T=16, BLOCK_H=128)
    return out
