"""Dispatch: group the T*k routing slots by expert, each expert's segment padded to BLOCK_M.

Output, with S = T*k slots (slot s is token s // k, choice s % k), P = padded_size(S, E, BLOCK_M):
  sorted_slots [P] int32: slot ids grouped by expert in ascending slot order (stable, so the
      layout is deterministic); padding entries hold S (a sentinel past the end).
  block_expert [cdiv(P, BLOCK_M)] int32: the expert of each BLOCK_M block, -1 for the unused
      trailing blocks.
P = S + min(E, S) * (BLOCK_M - 1) bounds the padded total (each non-empty expert pads by at most
BLOCK_M - 1 and at most S experts are non-empty), so sizes depend on T, k, E and BLOCK_M only: no
host sync, CUDA-graph capturable. At decode (S < E) the bound also keeps the grouped GEMMs' grids
to the blocks that can be used.

Algorithm and grid: one program per expert (`align`, 1 launch, nothing pre-filled). Each program
histograms every expert over the slots in BLOCK_S = 1024 chunks (so each knows every segment's
start), scatters its own slots with a cumsum, and writes its 1/E share of the positions' layout
(sentinels in padding, each block's expert). E is small for DUME-shaped models (<= 8), so the
E-fold re-read of the ids is cheaper than a multi-kernel scan. The same helpers serve the
one-program routing + alignment of kernels/moe_routing.py (`_scatter_all` ranks every expert at
once with a [BLOCK_S, BLOCK_E] one-hot cumsum).

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
def _load_ids(ids_ptr, s, S):
    # .cg: read through L2, so ids just stored by this program (moe_routing's fused kernel, after
    # its barrier) are seen even if L1 still holds the old line.
    return tl.load(ids_ptr + s, mask=s < S, other=-1, cache_modifier=".cg")


@triton.jit
def histogram(ids_ptr, S, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """Slots per expert, [BLOCK_E] int64 (zero past E)."""
    experts = tl.arange(0, BLOCK_E)
    hist = tl.zeros((BLOCK_E,), dtype=tl.int64)
    for s0 in range(0, S, BLOCK_S):
        ids = _load_ids(ids_ptr, s0 + tl.arange(0, BLOCK_S).to(tl.int64), S)
        hist += tl.sum((ids[:, None] == experts[None, :]).to(tl.int64), axis=0)
    return hist


@triton.jit
def segment_starts(hist, BLOCK_M: tl.constexpr):
    """First sorted position of each expert's padded segment (exclusive cumsum)."""
    padded = (hist + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    return tl.cumsum(padded, axis=0) - padded


@triton.jit
def fill_layout(
    sorted_ptr, block_expert_ptr, p_lo, p_hi, hist, S,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """For positions p_lo <= p < p_hi: the sentinel S where no slot goes, and at each block's first
    position that block's expert (-1 past the used blocks). Slot entries are the scatter's."""
    experts = tl.arange(0, BLOCK_E)
    start = segment_starts(hist, BLOCK_M)
    end = start + (hist + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # experts past E end at the total
    total = tl.max(end, axis=0)
    sentinel = tl.zeros((BLOCK_S,), dtype=tl.int32) + S
    for p0 in range(p_lo, p_hi, BLOCK_S):
        p = p0 + tl.arange(0, BLOCK_S).to(tl.int64)
        inside = p < p_hi
        e = tl.sum((end[None, :] <= p[:, None]).to(tl.int64), axis=1)  # segment holding p
        mine = experts[None, :] == e[:, None]
        offset = p - tl.sum(tl.where(mine, start[None, :], 0), axis=1)
        count = tl.sum(tl.where(mine, hist[None, :], 0), axis=1)
        used = p < total
        tl.store(sorted_ptr + p, sentinel, mask=inside & (~used | (offset >= count)))
        block = tl.where(used, e, -1).to(tl.int32)
        tl.store(block_expert_ptr + p // BLOCK_M, block, mask=inside & (p % BLOCK_M == 0))


@triton.jit
def scatter_all(ids_ptr, sorted_ptr, S, start, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """Every slot to its place: start[e] + its rank among expert e's slots (one program)."""
    experts = tl.arange(0, BLOCK_E)
    placed = start
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        ids = _load_ids(ids_ptr, s, S)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int64)
        rank = tl.cumsum(onehot, axis=0) - 1 + placed[None, :]
        pos = tl.sum(onehot * rank, axis=1)
        tl.store(sorted_ptr + pos, s.to(tl.int32), mask=s < S)
        placed += tl.sum(onehot, axis=0)


@triton.jit
def moe_align_kernel(
    ids_ptr,  # [S] int64 expert per slot
    sorted_ptr,  # [P] int32 out
    block_expert_ptr,  # [P / BLOCK_M] int32 out
    S,
    E,
    P,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    e = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    hist = histogram(ids_ptr, S, BLOCK_S, BLOCK_E)
    pos = tl.sum(tl.where(experts == e, segment_starts(hist, BLOCK_M), 0))
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        hit = _load_ids(ids_ptr, s, S) == e
        rank = tl.cumsum(hit.to(tl.int64), axis=0) - 1
        tl.store(sorted_ptr + pos + rank, s.to(tl.int32), mask=hit)
        pos += tl.sum(hit.to(tl.int64))
    share = tl.cdiv(P, E)
    lo = e.to(tl.int64) * share
    fill_layout(sorted_ptr, block_expert_ptr, lo, tl.minimum(lo + share, P), hist, S,
                BLOCK_M, BLOCK_S, BLOCK_E)  # fmt: skip


@triton.jit
def row_offsets_kernel(
    sorted_ptr, out_ptr, n, stride_row, TOP_K: tl.constexpr, BLOCK: tl.constexpr
):
    """Writes slot_row_offset for n sorted entries: exposes the GEMMs' index math to tests."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    slots = tl.load(sorted_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + i, slot_row_offset(slots, TOP_K, stride_row), mask=i < n)


def padded_size(num_slots, num_experts, block_m):
    return num_slots + min(num_experts, num_slots) * (block_m - 1)


def layout_buffers(num_slots, num_experts, block_m, device):
    """Uninitialised (sorted_slots, block_expert) of the static sizes above."""
    size = padded_size(num_slots, num_experts, block_m)
    sorted_slots = torch.empty(size, device=device, dtype=torch.int32)
    block_expert = torch.empty(triton.cdiv(size, block_m), device=device, dtype=torch.int32)
    return sorted_slots, block_expert


def block_e(num_experts):
    return max(2, triton.next_power_of_2(num_experts))


def align(topk_ids, num_experts, block_m):
    """-> (sorted_slots int32, block_expert int32); see the module docstring. One launch."""
    flat = topk_ids.reshape(-1).contiguous()
    num_slots = flat.numel()
    sorted_slots, block_expert = layout_buffers(num_slots, num_experts, block_m, flat.device)
    if num_slots:
        moe_align_kernel[(num_experts,)](
            flat, sorted_slots, block_expert, num_slots, num_experts, sorted_slots.numel(),
            BLOCK_M=block_m, BLOCK_S=1024, BLOCK_E=block_e(num_experts),
        )  # fmt: skip
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
