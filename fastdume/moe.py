"""fastdume.moe: the production inference face (routing op, fused MoE, the DUME model)."""

from fastdume.ops.moe import fused_moe, route

__all__ = ["fused_moe", "route"]
