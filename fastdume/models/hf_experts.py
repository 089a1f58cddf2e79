"""fastdume's fused experts as a transformers experts implementation named "fastdume".

transformers 5 MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...) decorate their experts
module with `use_experts_implementation`, whose forward looks `config._experts_implementation` up
in `ExpertsInterface`. Registering a function there lets those models run on fastdume.ops.moe with
no monkey-patching:

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="fastdume")
    # or, on a loaded model:
    fastdume.moe.accelerate(model)

Experts that the fused path does not cover (biases, transposed or interleaved weights, no gate, a
post-expert norm, an activation other than SiLU, expert parallelism) fall back to transformers'
own grouped_mm implementation, so choosing "fastdume" is always safe.
"""

import torch.nn as nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
from transformers.integrations.moe import grouped_mm_experts_forward as _fallback

from fastdume.ops.moe import moe_experts

NAME = "fastdume"


def supported(experts):
    """True when `experts` is a plain concatenated gate/up SwiGLU block fastdume can run."""
    # has_post_expert_norm and _is_expert_parallel came after transformers 5.17: absent = neither.
    return (
        getattr(experts, "has_gate", False)
        and not getattr(experts, "has_bias", True)
        and not getattr(experts, "is_transposed", True)
        and getattr(experts, "is_concatenated", False)
        and not getattr(experts, "has_post_expert_norm", False)
        and not getattr(experts, "_is_expert_parallel", False)
        and isinstance(getattr(experts, "act_fn", None), (nn.SiLU, SiLUActivation))
    )


def fastdume_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The experts forward transformers calls: [S, H] rows, [S, k] expert ids and weights."""
    if not supported(self):
        return _fallback(self, hidden_states, top_k_index, top_k_weights)
    gate_up, down = self.gate_up_proj, self.down_proj
    # Under autocast the hidden states can arrive in fp32 with bf16 weights.
    x = hidden_states.to(gate_up.dtype)
    out = moe_experts(
        x,
        top_k_weights,
        top_k_index,
        gate_up,
        down,
        backend=getattr(self, "fastdume_backend", None),
        check_ids=False,  # transformers' router picked them: no host sync per layer
    )
    return out.to(hidden_states.dtype)


def register():
    """Make "fastdume" a valid `experts_implementation` (idempotent; done on import)."""
    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(NAME, fastdume_experts_forward)


def accelerate(model, backend=None):
    """Run every MoE experts block of a transformers model on fastdume's fused path.

    backend: None (Triton on CUDA, torch elsewhere), "torch" or "triton". DUME models need no
    call (DumeMoE always uses fastdume.ops.moe); they are returned unchanged. Returns `model`.
    """
    from fastdume.models.modeling import DumeForCausalLM

    if isinstance(model, DumeForCausalLM):
        return model
    if not hasattr(model, "set_experts_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "has_gate")]
    if not experts:
        raise ValueError(
            f"model ({type(model).__name__}) has no experts module that uses transformers' "
            "experts interface, so there is nothing to accelerate"
        )
    register()
    model.set_experts_implementation(NAME)
    for module in experts:
        module.fastdume_backend = backend
    return model


register()
