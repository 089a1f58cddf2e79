"""The Triton expert computation as the custom op `fastdume::moe_experts`, with its backward.

Forward: kernels/moe_align.py + kernels/moe_grouped.py (on a CPU tensor, under the Triton
interpreter). Backward: torch ops, not kernels (`experts_backward`): each expert recomputes its
gate/up projection on its own rows and runs four matmuls; dx is kept per slot and summed over k in
a fixed order (no index_add_, whose CUDA atomics would make it non-deterministic). Both are custom
ops with fake implementations, so torch.compile treats them as opaque nodes.
"""

import torch
import torch.nn.functional as F

from fastdume.ops import _backend, moe_configs


def _config(kern, hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj):
    num_experts, two_i, hidden = gate_up_proj.shape
    device, dtype, num_tokens = hidden_states.device, hidden_states.dtype, hidden_states.shape[0]
    if device.type != "cuda":
        return moe_configs.interpreter_config()
    name = moe_configs.device_name(device)
    if not moe_configs.autotune_enabled():
        return moe_configs.get_config(num_experts, hidden, two_i // 2, dtype, name, num_tokens)
    import triton.testing

    def measure(config):
        args = (hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj, config)
        return triton.testing.do_bench(lambda: kern.experts_forward(*args))

    key = (
        f"{name}|{moe_configs.shape_key(num_experts, hidden, two_i // 2, dtype)}"
        f"|k={topk_ids.shape[1]}|T<={moe_configs.token_bucket(num_tokens)}"
    )
    return moe_configs.tuned_config(key, moe_configs.candidates(), measure)


@torch.library.custom_op("fastdume::moe_experts", mutates_args=())
def moe_experts_op(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    if hidden_states.shape[0] == 0:
        return hidden_states.new_empty(hidden_states.shape)
    kern = _backend.kernels("moe_grouped", hidden_states.device)
    config = _config(kern, hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj)
    return kern.experts_forward(
        hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj, config
    )


@moe_experts_op.register_fake
def _(hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj):
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
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj = ctx.saved_tensors
    dx, dw, dgu, dd = torch.ops.fastdume.moe_experts_backward(
        grad_out.contiguous(), hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj
    )
    return dx, dw, None, dgu, dd


moe_experts_op.register_autograd(_backward, setup_context=_setup_context)
