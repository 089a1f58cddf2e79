"""fastdume.moe: the production inference face (routing op, fused MoE, the DUME model)."""

from fastdume.models.hf_experts import accelerate
from fastdume.models.mixtral import export_mixtral
from fastdume.models.modeling import (
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
