"""The Triton expert computation as the custom op `fastdume::moe_experts`, with its backward.

Forward: kernels/moe_align.py + kernels/moe_grouped.py (on a CPU tensor, under the Triton
interpreter). The launch config is chosen once per call, by `choose_config`, before routing (a
FUSED_ROUTING config routes and aligns in one launch, so the layout it made is handed to the op)
and travels into the op as a JSON string. Backward: torch ops, not kernels (`experts_backward`):
each expert recomputes its gate/up projection on its own rows and runs four matmuls; dx is kept per
slot and summed over k in a fixed order (no index_add_, whose CUDA atomics would make it
non-deterministic). Both are custom ops with fake implementations, so torch.compile treats them as
opaque nodes.
"""

import functools
import json
import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastdume.ops import _backend, moe_configs


def choose_config(hidden_states, gate_up_proj, down_proj, top_k, router=None, routing=None):
    """The complete launch config for this call. For the autotuner, either router = (weight,
    bias, temperature) when the op also routes (fused_moe: routing is timed too, FUSED_ROUTING
    may win) or routing = (topk_weights, topk_ids) when the caller routed (moe_experts)."""
    num_experts, two_i, hidden = gate_up_proj.shape
    device, dtype, num_tokens = hidden_states.device, hidden_states.dtype, hidden_states.shape[0]
    if device.type != "cuda":
        return moe_configs.interpreter_config()
    name = moe_configs.device_name(device)
    if not moe_configs.autotune_enabled():
        return moe_configs.get_config(num_experts, hidden, two_i // 2, dtype, name, num_tokens)
    import triton.testing

    kern = _backend.kernels("moe_grouped", device)
    x, tensors = hidden_states.detach(), (gate_up_proj.detach(), down_proj.detach())

    def measure(config):
        if router is not None:
            weight, bias, temperature = router
            run = lambda: kern.forward(x, weight, bias, *tensors, top_k, temperature, config)
        else:
            run = lambda: kern.experts_forward(x, *routing, *tensors, config)
        try:
            return triton.testing.do_bench(run)
        except Exception:  # e.g. a design variant out of shared memory on this card: not a pick
            return math.inf

    key = (
        f"{name}|{moe_configs.shape_key(num_experts, hidden, two_i // 2, dtype)}"
        f"|k={top_k}|T<={moe_configs.token_bucket(num_tokens)}"
        f"|{'routed' if router is not None else 'experts'}"
    )
    candidates = moe_configs.candidates(routed=router is not None)
    with torch.no_grad():
        return moe_configs.tuned_config(key, candidates, measure)


@functools.lru_cache(maxsize=256)
def _parse(config):
    return json.loads(config)


def experts(hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj, config, aligned=None):
    """The custom op for a chosen config; aligned: (sorted_slots, block_expert) or None."""
    sorted_slots, block_expert = aligned if aligned is not None else (None, None)
    return torch.ops.fastdume.moe_experts(
        hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj,
        json.dumps(config, sort_keys=True), sorted_slots, block_expert,
    )  # fmt: skip


@torch.library.custom_op("fastdume::moe_experts", mutates_args=())
def moe_experts_op(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    config: str = "",
    sorted_slots: Optional[torch.Tensor] = None,  # noqa: UP045  (custom_op reads typing.Optional)
    block_expert: Optional[torch.Tensor] = None,  # noqa: UP045
) -> torch.Tensor:
    """config: JSON of a complete launch config, "" = choose it here; sorted_slots and
    block_expert: the layout a FUSED_ROUTING dispatch made for that config's BLOCK_M."""
    if hidden_states.shape[0] == 0:
        return hidden_states.new_empty(hidden_states.shape)
    kern = _backend.kernels("moe_grouped", hidden_states.device)
    if config:
        config = _parse(config)
    else:
        routing = (topk_weights, topk_ids)
        config = choose_config(
            hidden_states, gate_up_proj, down_proj, topk_ids.shape[1], routing=routing
        )
    aligned = None if sorted_slots is None else (sorted_slots, block_expert)
    return kern.experts_forward(
        hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj, config, aligned
    )


@moe_experts_op.register_fake
def _(hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj, config="", *layout):
    return hidden_states.new_empty(hidden_states.shape)


@torch.library.custom_op("fastdume::moe_experts_backward", mutates_args=())
def experts_backward(
    grad_out: torch.Tensor,
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d hidden_states, d topk_weights, d gate_up_proj, d down_proj), torch ops."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, hidden = gate_up_proj.shape
    inter = two_i // 2
    dtype = hidden_states.dtype
    acc = torch.promote_types(dtype, torch.float32)  # fp32 math for bf16/fp16, fp64 stays fp64
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    slot_weights = topk_weights.reshape(-1).to(acc)
    dx_slot = hidden_states.new_zeros(num_tokens * top_k, hidden, dtype=acc)
    d_weights = torch.zeros(num_tokens * top_k, device=flat.device, dtype=acc)
    d_gate_up = torch.zeros_like(gate_up_proj)
    d_down = torch.zeros_like(down_proj)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start : start + count]
        start += count
        x = hidden_states[rows // top_k]
        gate, up = (x @ gate_up_proj[e].T).to(acc).split(inter, dim=-1)
        act = F.silu(gate) * up
        go = grad_out[rows // top_k].to(acc)
        # dL/dw_j = <grad_out_t, y_j> with y_j the expert's (unweighted) output.
        y = act.to(dtype) @ down_proj[e].T
        d_weights[rows] = (go * y.to(acc)).sum(dim=-1)
        gy = (go * slot_weights[rows, None]).to(dtype)
        d_down[e] = gy.T @ act.to(dtype)
        d_act = (gy @ down_proj[e]).to(acc)
        sig = torch.sigmoid(gate)
        d_gate = d_act * up * sig * (1 + gate * (1 - sig))
        d_up = d_act * gate * sig
        d_gu = torch.cat([d_gate, d_up], dim=-1).to(dtype)
        d_gate_up[e] = d_gu.T @ x
        dx_slot[rows] = (d_gu @ gate_up_proj[e]).to(acc)
    dx = dx_slot.view(num_tokens, top_k, hidden).sum(dim=1).to(dtype)
    return dx, d_weights.view(num_tokens, top_k).to(topk_weights.dtype), d_gate_up, d_down


@experts_backward.register_fake
def _(grad_out, hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj):
    return (
        torch.empty_like(hidden_states),
        torch.empty_like(topk_weights),
        torch.empty_like(gate_up_proj),
        torch.empty_like(down_proj),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])


def _backward(ctx, grad_out):
    hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj = ctx.saved_tensors
    dx, dw, dgu, dd = torch.ops.fastdume.moe_experts_backward(
        grad_out.contiguous(), hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj
    )
    return dx, dw, None, dgu, dd, None, None, None


moe_experts_op.register_autograd(_backward, setup_context=_setup_context)
