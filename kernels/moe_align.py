"""Dispatch: group the T*k routing slots by expert, each expert's segment padded to BLOCK_M.

Output, with S = T*k slots (slot s is token s // k, choice s % k):
  sorted_slots [S + E*(BLOCK_M-1)] int32: slot ids grouped by expert in ascending slot order
      (stable, so the layout is deterministic); padding entries hold S (a sentinel past the end).
  block_expert [cdiv(len(sorted_slots), BLOCK_M)] int32: the expert of each BLOCK_M block, -1 for
      the unused trailing blocks. Sizes are static bounds, so no host sync (CUDA-graph friendly).

Tiles: one program per expert; each scans the slots in BLOCK_S = 1024 chunks twice (a histogram
of every expert to find its own segment start, then a cumsum scatter of its own slots). E is
small for DUME-shaped models (<= 8), so the E-fold re-read is cheaper than a multi-kernel scan.

All row offsets derived from slot ids go through `slot_row_offset` (64-bit), shared with the GEMMs.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def slot_row_offset(slots, TOP_K: tl.constexpr, stride_row):
    """Element offset of a slot's token row: (slot // k) * stride, in int64 (T*k*H passes 2^31)."""
    return (slots.to(tl.int64) // TOP_K) * stride_row


@triton.jit
def moe_align_kernel(
    ids_ptr,  # [S] int64 expert per slot
    sorted_ptr,  # [S + E*(BLOCK_M-1)] int32, pre-filled with S
    block_expert_ptr,  # [num_blocks] int32, pre-filled with -1
    S,
    E,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    e = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)

    hist = tl.zeros((BLOCK_E,), dtype=tl.int64)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        ids = tl.load(ids_ptr + s, mask=s < S, other=-1)
        hist += tl.sum((ids[:, None] == experts[None, :]).to(tl.int64), axis=0)
    padded = (hist + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(experts < e, padded, 0))
    count = tl.sum(tl.where(experts == e, hist, 0))

    first_block = start // BLOCK_M
    for b0 in range(0, (count + BLOCK_M - 1) // BLOCK_M, BLOCK_S):
        b = b0 + tl.arange(0, BLOCK_S).to(tl.int64)
        mine = b < (count + BLOCK_M - 1) // BLOCK_M
        expert = tl.full((BLOCK_S,), 0, tl.int32) + e
        tl.store(block_expert_ptr + first_block + b, expert, mask=mine)

    pos = start
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        ids = tl.load(ids_ptr + s, mask=s < S, other=-1)
        hit = ids == e
        rank = tl.cumsum(hit.to(tl.int64), axis=0) - 1
        tl.store(sorted_ptr + pos + rank, s.to(tl.int32), mask=hit)
        pos += tl.sum(hit.to(tl.int64))


@triton.jit
def row_offsets_kernel(
    sorted_ptr, out_ptr, n, stride_row, TOP_K: tl.constexpr, BLOCK: tl.constexpr
):
    """Writes slot_row_offset for n sorted entries: exposes the GEMMs' index math to tests."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    slots = tl.load(sorted_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + i, slot_row_offset(slots, TOP_K, stride_row), mask=i < n)


def padded_size(num_slots, num_experts, block_m):
    return num_slots + num_experts * (block_m - 1)


def align(topk_ids, num_experts, block_m):
    """-> (sorted_slots int32, block_expert int32); see the module docstring."""
    flat = topk_ids.reshape(-1).contiguous()
    num_slots = flat.numel()
    size = padded_size(num_slots, num_experts, block_m)
    sorted_slots = torch.full((size,), num_slots, device=flat.device, dtype=torch.int32)
    block_expert = torch.full(
        (triton.cdiv(size, block_m),), -1, device=flat.device, dtype=torch.int32
    )
    if num_slots:
        moe_align_kernel[(num_experts,)](
            flat,
            sorted_slots,
            block_expert,
            num_slots,
            num_experts,
            BLOCK_M=block_m,
            BLOCK_S=1024,
            BLOCK_E=max(2, triton.next_power_of_2(num_experts)),
        )
    return sorted_slots, block_expert


def row_offsets(sorted_slots, top_k, stride_row):
    """int64 element offsets of each sorted slot's token row, via the kernels' index helper."""
    n = sorted_slots.numel()
    out = torch.empty(n, device=sorted_slots.device, dtype=torch.int64)
    block = 4096
    row_offsets_kernel[(triton.cdiv(n, block),)](
        sorted_slots, out, n, stride_row, TOP_K=top_k, BLOCK=block
    )
    return out
