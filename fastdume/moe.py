"""fastdume.moe: the production inference face (routing op, fused MoE, the DUME model)."""

from fastdume.hf_experts import accelerate
from fastdume.mixtral import export_mixtral
from fastdume.modeling_dume import (
    DumeConfig,
    DumeExperts,
    DumeForCausalLM,
    DumeMoE,
    DumeRouter,
    forced_expert,
)
from fastdume.ops.moe import fused_moe, route

__all__ = [
    "accelerate",
    "DumeConfig",
    "DumeExperts",
    "DumeForCausalLM",
    "DumeMoE",
    "DumeRouter",
    "export_mixtral",
    "forced_expert",
    "fused_moe",
    "route",
]
