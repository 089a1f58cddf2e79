"""MoE routing: fp32 logits (bias, temperature), top-k, softmax over the k; optionally with the
block-aligned dispatch of kernels/moe_align.py in the same launch.

Semantics match fastdume.ops.moe.route_torch: NaN logits count as -inf, ties go to the lower
expert index, a token whose selected scores are all -inf gets 1/k on experts picked in index order.

Tiles: BLOCK_T = 16 tokens per step (the smallest tl.dot M) and the whole expert axis padded to
BLOCK_E >= 16 in registers, so the top-k runs on the logits without touching memory again;
BLOCK_H = 64 keeps the x and W tiles at 4 KiB each in fp32.

Two kernels:
- moe_route_kernel, grid (cdiv(T, 16),): one BLOCK_T tile of tokens per program; 1 launch. The
  alignment then runs as its own launch (moe_align.align), so routing + alignment = 2 launches.
- moe_route_align_kernel, grid (1,): one program routes every token (T/16 sequential tiles),
  stores ids and weights, passes a barrier, then histograms, scatters and writes the padded
  layout itself: routing + alignment in 1 launch with nothing pre-filled. One program is the
  whole GPU's share of the work, so it only pays at small T (decode), where the launch it saves is
  a visible part of the time; the config key FUSED_ROUTING lets the tuner choose it per bucket.
Neither counts tokens per expert with atomics: the alignment counts them once, where needed.
Both are CUDA-graph capturable: output sizes depend on T, k, E and BLOCK_M only.
"""

import torch
import triton
import triton.language as tl
from fastdume.kernels.moe_align import (
    block_e,
    fill_layout,
    histogram,
    layout_buffers,
    scatter_all,
    segment_starts,
)


@triton.jit
def _route_tile(
    x_ptr, w_ptr, b_ptr, weights_ptr, ids_ptr, rows, T, H, E, temperature, stride_xt,
    HAS_BIAS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Routes the tokens `rows` (a BLOCK_T vector) and stores their weights and ids."""
    row_ok = rows < T
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < E

    # Logits in fp32 whatever the activation dtype; "ieee" keeps tensor cores from using tf32.
    logits = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        x = tl.load(
            x_ptr + rows[:, None] * stride_xt + hs[None, :],
            mask=row_ok[:, None] & h_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(
            w_ptr + experts[None, :].to(tl.int64) * H + hs[:, None],
            mask=h_ok[:, None] & expert_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        logits = tl.dot(x, w, logits, input_precision="ieee")
    if HAS_BIAS:
        logits += tl.load(b_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)[None, :]
    logits = logits / temperature
    logits = tl.where(logits != logits, float("-inf"), logits)

    # Top-k by repeated arg-max: the max, then the lowest not-yet-taken index holding it.
    # Padding columns start out taken, so they are never chosen.
    taken = (experts[None, :] >= E) | (rows[:, None] < 0)
    slot = tl.arange(0, BLOCK_K)
    top_scores = tl.full((BLOCK_T, BLOCK_K), float("-inf"), tl.float32)
    top_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.where(taken, float("-inf"), logits), axis=1)
        hit = (~taken) & (logits == best[:, None])
        pick = tl.min(tl.where(hit, experts[None, :], BLOCK_E), axis=1)
        taken = taken | (experts[None, :] == pick[:, None])
        top_scores = tl.where(slot[None, :] == j, best[:, None], top_scores)
        top_ids = tl.where(slot[None, :] == j, pick[:, None].to(tl.int64), top_ids)

    # Softmax over the k winners; the first is the largest. All -inf: equal weights.
    slot_ok = slot[None, :] < TOP_K
    first = tl.max(tl.where(slot_ok, top_scores, float("-inf")), axis=1)
    dead = first == float("-inf")
    p = tl.exp(top_scores - tl.where(dead, 0.0, first)[:, None])
    p = tl.where(dead[:, None], 1.0, p)
    p = tl.where(slot_ok, p, 0.0)
    p = p / tl.sum(p, axis=1)[:, None]

    out = rows[:, None] * TOP_K + slot[None, :]
    keep = row_ok[:, None] & slot_ok
    tl.store(weights_ptr + out, p, mask=keep)
    tl.store(ids_ptr + out, top_ids, mask=keep)


@triton.jit
def moe_route_kernel(
    x_ptr,  # [T, H] any float dtype, row stride stride_xt
    w_ptr,  # [E, H] router weight (fp32 in DUME), contiguous
    b_ptr,  # [E] router bias or a dummy pointer when HAS_BIAS is False
    weights_ptr,  # [T, TOP_K] fp32 out
    ids_ptr,  # [T, TOP_K] int64 out
    T,
    H,
    E,
    temperature,
    stride_xt,
    HAS_BIAS: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    _route_tile(x_ptr, w_ptr, b_ptr, weights_ptr, ids_ptr, rows, T, H, E, temperature, stride_xt,
                HAS_BIAS, TOP_K, BLOCK_K, BLOCK_T, BLOCK_E, BLOCK_H)  # fmt: skip


@triton.jit
def moe_route_align_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    weights_ptr,
    ids_ptr,
    sorted_ptr,  # [P] int32 out, as moe_align
    block_expert_ptr,  # [P / BLOCK_M] int32 out
    T,
    H,
    E,
    P,
    temperature,
    stride_xt,
    HAS_BIAS: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        _route_tile(x_ptr, w_ptr, b_ptr, weights_ptr, ids_ptr, rows, T, H, E, temperature,
                    stride_xt, HAS_BIAS, TOP_K, BLOCK_K, BLOCK_T, BLOCK_E, BLOCK_H)  # fmt: skip
    tl.debug_barrier()  # the ids just stored are read back by every thread of this program
    S = T * TOP_K
    hist = histogram(ids_ptr, S, BLOCK_S, BLOCK_E)
    scatter_all(ids_ptr, sorted_ptr, S, segment_starts(hist, BLOCK_M), BLOCK_S, BLOCK_E)
    fill_layout(sorted_ptr, block_expert_ptr, 0, P, hist, S, BLOCK_M, BLOCK_S, BLOCK_E)


def _tiles(top_k, num_experts):
    return {
        "TOP_K": top_k,
        "BLOCK_K": triton.next_power_of_2(top_k),
        "BLOCK_T": 16,
        "BLOCK_E": max(16, block_e(num_experts)),
        "BLOCK_H": 64,
    }


def _outputs(num_tokens, top_k, device):
    weights = torch.empty(num_tokens, top_k, device=device, dtype=torch.float32)
    return weights, torch.empty(num_tokens, top_k, device=device, dtype=torch.int64)


def route(hidden_states, router_weight, router_bias, top_k, temperature):
    """-> (topk_weights [T, k] fp32, topk_ids [T, k] int64): one launch, no host sync."""
    num_tokens, hidden = hidden_states.shape
    num_experts = router_weight.shape[0]
    weights, ids = _outputs(num_tokens, top_k, hidden_states.device)
    if num_tokens == 0:
        return weights, ids
    moe_route_kernel[(triton.cdiv(num_tokens, 16),)](
        hidden_states, router_weight.contiguous(),
        router_weight if router_bias is None else router_bias.contiguous(),
        weights, ids, num_tokens, hidden, num_experts, float(temperature),
        hidden_states.stride(0), HAS_BIAS=router_bias is not None, **_tiles(top_k, num_experts),
    )  # fmt: skip
    return weights, ids


def route_align(hidden_states, router_weight, router_bias, top_k, temperature, block_m):
    """-> (topk_weights, topk_ids, sorted_slots, block_expert) in one launch (see the docstring);
    the last two exactly as moe_align.align(topk_ids, E, block_m) returns them."""
    num_tokens, hidden = hidden_states.shape
    num_experts = router_weight.shape[0]
    device = hidden_states.device
    weights, ids = _outputs(num_tokens, top_k, device)
    sorted_slots, block_expert = layout_buffers(num_tokens * top_k, num_experts, block_m, device)
    if num_tokens == 0:
        return weights, ids, sorted_slots, block_expert
    moe_route_align_kernel[(1,)](
        hidden_states, router_weight.contiguous(),
        router_weight if router_bias is None else router_bias.contiguous(),
        weights, ids, sorted_slots, block_expert, num_tokens, hidden, num_experts,
        sorted_slots.numel(), float(temperature), hidden_states.stride(0),
        HAS_BIAS=router_bias is not None, BLOCK_M=block_m, BLOCK_S=256,
        **_tiles(top_k, num_experts),
    )  # fmt: skip
    return weights, ids, sorted_slots, block_expert
