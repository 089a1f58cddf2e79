"""MoE routing in one kernel: fp32 logits (bias, temperature), top-k, softmax over the k.

Semantics match fastdume.ops.moe.route_torch: NaN logits count as -inf, ties go to the lower
expert index, a token whose selected scores are all -inf gets 1/k on experts picked in index order.

Tiles: BLOCK_T = 16 tokens per program (the smallest tl.dot M) and the whole expert axis padded to
BLOCK_E >= 16 in registers, so the top-k runs on the logits without touching memory again;
BLOCK_H = 64 keeps the x and W tiles at 4 KiB each in fp32.

Tokens per expert are not counted here: kernels/moe_align.py counts them once, in the kernel that
needs them (no atomics, no zero-filled buffer to launch).
"""

import torch
import triton
import triton.language as tl


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


def route(hidden_states, router_weight, router_bias, top_k, temperature):
    """-> (topk_weights [T, k] fp32, topk_ids [T, k] int64): one launch, no host sync."""
    num_tokens, hidden = hidden_states.shape
    num_experts = router_weight.shape[0]
    device = hidden_states.device
    weights = torch.empty(num_tokens, top_k, device=device, dtype=torch.float32)
    ids = torch.empty(num_tokens, top_k, device=device, dtype=torch.int64)
    if num_tokens == 0:
        return weights, ids
    block_t = 16
    grid = (triton.cdiv(num_tokens, block_t),)
    moe_route_kernel[grid](
        hidden_states,
        router_weight.contiguous(),
        router_weight if router_bias is None else router_bias.contiguous(),
        weights,
        ids,
        num_tokens,
        hidden,
        num_experts,
        float(temperature),
        hidden_states.stride(0),
        HAS_BIAS=router_bias is not None,
        TOP_K=top_k,
        BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_T=block_t,
        BLOCK_E=max(16, triton.next_power_of_2(num_experts)),
        BLOCK_H=64,
    )
    return weights, ids
