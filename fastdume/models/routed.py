"""routed="model": every tensor of the dense model kept once per expert ([E, ...]) and chosen per
token, through fastdume.ops.grouped_linear (grouped linear, per-token row and vector gathers).
The family's own decoder runs unchanged; its Linear, Embedding and RMSNorm modules are swapped
for the routed ones below, which read the current decision (`RoutingState.ids`, [B, S]) from
the state they share. With every token on expert e they compute exactly dense expert e's
operations (one plain linear, exact row copies), so forced routing reproduces the dense model
bit for bit.
"""

import torch
from torch import nn

from fastdume.ops.grouped_linear import gather_rows, gather_vectors, grouped_linear


class _Routed(nn.Module):
    """Base: `dume_state` (a RoutingState, set by the model) holds the current decision."""

    dume_state = None

    def _ids(self, ids, rows):
        ids = self.dume_state.ids if ids is None else ids
        if ids is None or ids.numel() != rows:
            raise RuntimeError(
                f"{type(self).__name__}: no routing decision for these {rows} tokens (run the "
                "DumeForCausalLM, not its decoder alone)"
            )
        return ids.reshape(-1)


class RoutedLinear(_Routed):
    def __init__(self, num_experts, in_features, out_features, bias=False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None

    def forward(self, x, ids=None):
        rows = x.reshape(-1, self.in_features)
        experts = self._ids(ids, rows.shape[0])
        # ids come from the router: no host-side range check
        y = grouped_linear(rows, self.weight, experts, self.bias, check_ids=False)
        return y.reshape(*x.shape[:-1], self.out_features)


class RoutedEmbedding(_Routed):
    def __init__(self, num_experts, num_embeddings, embedding_dim, padding_idx=None):
        super().__init__()
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.empty(num_experts, num_embeddings, embedding_dim))

    def forward(self, input_ids):
        experts = self._ids(None, input_ids.numel())
        rows = gather_rows(self.weight, experts, input_ids.reshape(-1), check_ids=False)
        return rows.reshape(*input_ids.shape, -1)


class RoutedRMSNorm(_Routed):
    """The families' RMSNorm (fp32 normalisation, weight * x in the input dtype) with a weight
    per expert. decides: the router index this norm routes on first (a block's input norm sees
    the residual stream entering the block), or None."""

    def __init__(self, num_experts, dim, eps, decides=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.variance_epsilon = eps
        self.decides = decides

    def forward(self, hidden_states):
        if self.decides is not None:
            self.dume_state.decide(self.decides, hidden_states)
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        # ids [B, S]; x [B, S, H] or [B, S, heads, head_dim] (Qwen3's q/k norms)
        lead = hidden_states.shape[:2]
        weight = gather_vectors(self.weight, self._ids(None, lead.numel()), check_ids=False)
        weight = weight.reshape(*lead, *[1] * (h.dim() - 3), h.shape[-1])
        return weight * h.to(dtype)


def _is_rms_norm(module):
    return "RMSNorm" in type(module).__name__ and hasattr(module, "variance_epsilon")


def route_whole_model(decoder, num_experts, state, decide_layers):
    """Replace, in place, every Linear, Embedding and RMSNorm of the family's `decoder` by its
    routed version. decide_layers: the layer indices whose input norm routes first."""
    for name, module in list(decoder.named_modules()):
        if not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = decoder.get_submodule(parent_name) if parent_name else decoder
        new = _routed_copy(module, num_experts, name, decide_layers)
        if new is not None:
            new.dume_state = state
            setattr(parent, child, new)
        elif module._parameters and not isinstance(module, _Routed):
            raise ValueError(
                f"routed='model' does not know how to route {name} ({type(module).__name__})"
            )


def _routed_copy(module, num_experts, name, decide_layers):
    if isinstance(module, nn.Linear):
        return RoutedLinear(
            num_experts, module.in_features, module.out_features, module.bias is not None
        )
    if isinstance(module, nn.Embedding):
        return RoutedEmbedding(
            num_experts, module.num_embeddings, module.embedding_dim, module.padding_idx
        )
    if _is_rms_norm(module):
        decides = None
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "layers" and parts[2] == "input_layernorm":
            decides = int(parts[1]) if int(parts[1]) in decide_layers else None
        return RoutedRMSNorm(num_experts, module.weight.shape[0], module.variance_epsilon, decides)
    return None


def routed_modules(model):
    """Every routed module of `model` (their parameters are the per-expert tensors)."""
    return [m for m in model.modules() if isinstance(m, _Routed)]
