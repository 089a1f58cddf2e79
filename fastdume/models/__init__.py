"""The DUME model (config, router, experts, MoE block), the transformers experts interface and
the Mixtral export. Importing this package registers the DUME architecture with transformers'
Auto classes and the "fastdume" experts implementation."""

from fastdume.models import hf_experts, modeling  # noqa: F401  (registration on import)
