"""Export a DUME model as a standard Mixtral checkpoint that plain transformers loads.

Mixtral routes with softmax over all E logits, top-k of the probabilities, then renormalises
the k winners: exp(l_i) / sum_topk exp(l_j), which is DUME's softmax over the top-k logits.
What Mixtral cannot express is the router bias, so the export needs a bias that is the same for
every expert of a layer (zero, or any constant, which changes neither the top-k nor the
softmax over it). A fitted DUME router has a real bias, so it is refused, saying which layer.
The temperature is folded into the router weight (logits / T = x (W / T)^T). Mixtral keeps its
router in the model dtype, so a bf16/fp16 export routes with rounded logits (fp32 is exact).
"""

import torch
import transformers

from fastdume._atomic import atomic_directory

# dense config fields that mean the same thing in a Mixtral config
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "sliding_window",
)


def mixtral_config(config):
    """The MixtralConfig equivalent to a DumeConfig, or ValueError saying why there is none."""
    base = config.base_config
    if config.routed != "mlp":
        raise ValueError(
            f"export_mixtral: the model has routed={config.routed!r}; Mixtral shares attention, "
            "norms, embeddings and LM head between its experts and routes only the MLPs, so a "
            "model with every tensor per expert has no Mixtral equivalent"
        )
    if (config.router_features, config.router_depth) != ("token", "layer"):
        raise ValueError(
            f"export_mixtral: the model routes with router_features={config.router_features!r}, "
            f"router_depth={config.router_depth!r}; a Mixtral router is a per-layer linear map "
            "of the token's MoE input ('token', 'layer') and cannot express it"
        )
    if config.dense_family not in ("llama", "mistral"):
        raise ValueError(
            f"export_mixtral needs a Llama or Mistral base (Mixtral's attention), "
            f"got dense_family={config.dense_family!r}"
        )
    if base.get("attention_bias"):
        raise ValueError("export_mixtral: the base has attention_bias=True, which Mixtral lacks")
    fields = {k: base[k] for k in _SHARED_FIELDS if k in base}
    return transformers.MixtralConfig(
        **fields,
        num_local_experts=config.num_experts,
        num_experts_per_tok=config.top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )


def _router_weight(layer_idx, moe, dtype):
    bias = moe.router.bias
    if bias is not None and not bool((bias == bias[0]).all()):
        raise ValueError(
            f"export_mixtral: layer {layer_idx}'s router has a bias that differs between experts "
            f"(range {bias.min().item():.4g}..{bias.max().item():.4g}); Mixtral routers have "
            "no bias. Fit the router with fit_intercept=False to export."
        )
    return (moe.router.weight.detach().double() / moe.temperature).to(dtype)


def mixtral_state_dict(model):
    """Mixtral parameter names -> tensors (sharing storage with `model` except the routers)."""
    state = {}
    layers = model.dume_layers()
    dtype = layers[0].experts.gate_up_proj.dtype
    for name, tensor in model.state_dict().items():
        if ".mlp.router." not in name:
            state[name] = tensor
    for i, moe in enumerate(layers):
        state.pop(f"model.layers.{i}.mlp.router.bias", None)
        state[f"model.layers.{i}.mlp.gate.weight"] = _router_weight(i, moe, dtype)
    return state


def export_mixtral(model, directory):
    """Write `model` (a DumeForCausalLM) to `directory` as a MixtralForCausalLM checkpoint.

    Raises ValueError, before writing anything, when the model has no Mixtral equivalent.
    `directory` must not exist or be empty; it appears only once the checkpoint is complete.
    """
    config = mixtral_config(model.config)
    state = mixtral_state_dict(model)
    # Built on the meta device and filled by reference: the export costs no second model copy.
    with torch.device("meta"):
        mixtral = transformers.MixtralForCausalLM(config)
    mixtral.load_state_dict(state, strict=True, assign=True)
    mixtral.generation_config = model.generation_config
    with atomic_directory(directory) as tmp:
        mixtral.save_pretrained(tmp)
    return directory
