"""Mixture-of-Experts op: routing and the expert computation, torch path and Triton path.

Routing semantics (the public contract): logits = (x @ W^T + b) / temperature in fp32; the top_k
largest logits win, ties going to the lower expert index; the k winners get softmax weights over
their own scores. NaN logits count as -inf, so they never beat a finite logit; a token whose
logits are all NaN goes to experts 0..k-1 with equal weights.

The torch path groups tokens by expert and runs each expert once on its own rows, so its cost is
that of one dense MLP per routed token, not E of them.

The Triton path (backend="triton"; the default on CUDA) is kernels/moe_routing.py (routing),
kernels/moe_align.py (block-aligned dispatch) and kernels/moe_grouped.py (two grouped GEMMs and a
fixed-order k-reduction). Its expert part is the custom op `fastdume::moe_experts` (opaque to
torch.compile, with a fake implementation). fused_moe resolves the backend once and, on Triton,
chooses one launch config (ops/moe_configs) before routing, used by every kernel of the call.
Backward: torch ops, not kernels (experts_backward in ops/moe_triton.py: grouped per expert like
the forward, per-slot dx summed over k in a fixed order); router
gradients flow through a torch re-computation of the k selected logits and their softmax.
"""

import torch
import torch.nn.functional as F

from fastdume.ops import _backend, moe_triton

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_router(x, weight, bias, top_k, temperature):
    if x.dim() != 2:
        raise ValueError(f"hidden_states must be [T, H], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"router_weight must be [E, H={x.shape[1]}], got shape {tuple(weight.shape)}"
        )
    num_experts = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (num_experts,):
        raise ValueError(f"router_bias must be [E={num_experts}], got shape {tuple(bias.shape)}")
    for name, t in (("router_weight", weight), ("router_bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but hidden_states is on {x.device}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in 1..{num_experts}, got {top_k!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def _check_experts(x, topk_ids, gate_up_proj, down_proj, check_ids):
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(
            "gate_up_proj must be [E, 2I, H] and down_proj [E, H, I], got shapes "
            f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
        )
    num_experts, two_i, hidden = gate_up_proj.shape
    if hidden != x.shape[1] or two_i % 2:
        raise ValueError(
            f"gate_up_proj must be [E, 2I, H={x.shape[1]}], got shape {tuple(gate_up_proj.shape)}"
        )
    if tuple(down_proj.shape) != (num_experts, hidden, two_i // 2):
        raise ValueError(
            f"down_proj must be [E={num_experts}, H={hidden}, I={two_i // 2}], "
            f"got shape {tuple(down_proj.shape)}"
        )
    for name, t in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but hidden_states is on {x.device}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but hidden_states has {x.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if not check_ids:
        return
    # The range check reads the ids on the host; skip it while a CUDA graph is being captured.
    if topk_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if topk_ids.numel() and (topk_ids.min() < 0 or topk_ids.max() >= num_experts):
        raise ValueError(f"topk_ids must lie in 0..{num_experts - 1}")


def route_torch(hidden_states, router_weight, router_bias, top_k, temperature):
    logits = F.linear(
        hidden_states.float(),
        router_weight.float(),
        None if router_bias is None else router_bias.float(),
    )
    logits = logits / temperature
    logits = torch.nan_to_num(logits, nan=float("-inf"))
    # A stable descending sort makes ties (and all -inf rows) pick the lowest expert index.
    scores, ids = torch.sort(logits, dim=-1, descending=True, stable=True)
    scores, ids = scores[:, :top_k], ids[:, :top_k]
    weights = torch.softmax(scores, dim=-1)
    dead = torch.isneginf(scores[:, :1]).expand_as(weights)
    weights = torch.where(dead, torch.full_like(weights, 1.0 / top_k), weights)
    return weights, ids


def _selected_softmax(hidden_states, router_weight, router_bias, ids, temperature):
    """Differentiable weights for given winners: softmax over the k selected fp32 logits."""
    logits = F.linear(
        hidden_states.float(),
        router_weight.float(),
        None if router_bias is None else router_bias.float(),
    )
    scores = torch.nan_to_num(logits.gather(1, ids) / temperature, nan=float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    dead = torch.isneginf(scores.max(dim=-1, keepdim=True).values).expand_as(weights)
    return torch.where(dead, torch.full_like(weights, 1.0 / ids.shape[1]), weights)


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def route(hidden_states, router_weight, router_bias=None, top_k=1, temperature=1.0, backend=None):
    """-> (topk_weights [T, k] fp32, topk_ids [T, k] int64). See the module docstring."""
    _check_router(hidden_states, router_weight, router_bias, top_k, temperature)
    which = _backend.resolve(backend, hidden_states.device)
    return _route(which, hidden_states, router_weight, router_bias, top_k, temperature)


def _route(which, hidden_states, router_weight, router_bias, top_k, temperature):
    """Routing on an already resolved backend (the arguments are checked)."""
    if which == "torch":
        return route_torch(hidden_states, router_weight, router_bias, top_k, temperature)
    kern = _backend.kernels("moe_routing", hidden_states.device)
    weights, ids = kern.route(
        hidden_states.detach().contiguous(), router_weight.detach(),
        None if router_bias is None else router_bias.detach(), top_k, temperature,
    )  # fmt: skip
    if _wants_grad(hidden_states, router_weight, router_bias):
        weights = _selected_softmax(hidden_states, router_weight, router_bias, ids, temperature)
    return weights, ids


def experts_torch(hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj):
    """Grouped expert MLPs: each expert runs once on the rows routed to it."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, _ = gate_up_proj.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    per_slot = hidden_states.new_empty(num_tokens * top_k, hidden_states.shape[1])
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start : start + count]
        start += count
        gate, up = (hidden_states[rows // top_k] @ gate_up_proj[e].T).split(two_i // 2, dim=-1)
        per_slot[rows] = (F.silu(gate) * up) @ down_proj[e].T
    # The k contributions are summed in slot order, in at least fp32: deterministic for any batch.
    acc = torch.promote_types(per_slot.dtype, torch.float32)
    weighted = per_slot.view(num_tokens, top_k, per_slot.shape[1]).to(acc)
    weighted = weighted * topk_weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(hidden_states.dtype)


def moe_experts(
    hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj, backend=None, check_ids=True
):
    """Expert part of the MoE given the routing: sum_j w_j * down_j(silu(gate_j x) * up_j x).

    check_ids reads the ids on the host to verify they lie in 0..E-1: a device sync on CUDA, so
    callers whose ids come from a router (fused_moe, the models) pass False.
    """
    _check_experts(hidden_states, topk_ids, gate_up_proj, down_proj, check_ids)
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} differ"
        )
    which = _backend.resolve(backend, hidden_states.device)
    _check_triton_dtype(which, hidden_states)
    return _experts(which, hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj)


def _check_triton_dtype(which, hidden_states):
    if which == "triton" and hidden_states.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"hidden_states dtype must be one of {TRITON_DTYPES} for backend='triton', "
            f"got {hidden_states.dtype}"
        )


def _experts(which, hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj):
    """The expert part on an already resolved backend (the arguments are checked)."""
    if which == "torch":
        return experts_torch(hidden_states, topk_weights, topk_ids, gate_up_proj, down_proj)
    x = hidden_states.contiguous()
    config = moe_triton.choose_config(
        x, gate_up_proj, down_proj, topk_ids.shape[1], routing=(topk_weights, topk_ids)
    )
    return moe_triton.experts(x, topk_weights, topk_ids, gate_up_proj, down_proj, config)


def _fused_triton(x, router_weight, router_bias, gate_up_proj, down_proj, top_k, temperature):
    """fused_moe on Triton: one config for the whole call, chosen before routing, so that a
    FUSED_ROUTING config can route and align in one launch."""
    x = x.contiguous()
    router = (router_weight.detach(), None if router_bias is None else router_bias.detach())
    config = moe_triton.choose_config(
        x, gate_up_proj, down_proj, top_k, router=(*router, temperature)
    )
    kern = _backend.kernels("moe_grouped", x.device)
    weights, ids, aligned = kern.dispatch(x.detach(), *router, top_k, temperature, config)
    if _wants_grad(x, router_weight, router_bias):
        weights = _selected_softmax(x, router_weight, router_bias, ids, temperature)
    return moe_triton.experts(x, weights, ids, gate_up_proj, down_proj, config, aligned)


def fused_moe(
    hidden_states,
    router_weight,
    router_bias,
    gate_up_proj,
    down_proj,
    top_k=1,
    temperature=1.0,
    backend=None,
):
    """Route, then run the selected experts: [T, H] -> [T, H] in hidden_states' dtype.

    The backend is resolved once here and used for both parts."""
    _check_router(hidden_states, router_weight, router_bias, top_k, temperature)
    _check_experts(hidden_states, None, gate_up_proj, down_proj, check_ids=False)
    which = _backend.resolve(backend, hidden_states.device)
    _check_triton_dtype(which, hidden_states)
    if which == "triton":
        return _fused_triton(
            hidden_states, router_weight, router_bias, gate_up_proj, down_proj, top_k, temperature
        )
    weights, ids = route_torch(hidden_states, router_weight, router_bias, top_k, temperature)
    return experts_torch(hidden_states, weights, ids, gate_up_proj, down_proj)
