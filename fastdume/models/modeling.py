"""The DUME model: a dense Llama/Mistral/Qwen2/Qwen3 whose every MLP is a routed set of experts.

The dense family's own decoder (`XxxModel`) is built from the stored dense config and each
layer's MLP is swapped for a `DumeMoE`, so attention, norms, rotary embeddings, masks and the KV
cache are exactly the family's, and the state dict keeps the dense key names
(`model.layers.N.self_attn...`) next to `model.layers.N.mlp.router.*` / `.mlp.experts.*`.
"""

import contextlib

import torch
import transformers
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as hf_init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from fastdume.ops.moe import fused_moe, moe_experts

# transformers 5.2x renamed past_key_values to cache; the floor, 5.17, knows only the old name.
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# model_type -> (config class, decoder class, causal LM class) in transformers
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaModel", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralModel", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2Model", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3Model", "Qwen3ForCausalLM"),
}


def _kept_positions(logits_to_keep):
    """transformers' logits_to_keep: an int keeps the last n (0: all); a tensor indexes."""
    if isinstance(logits_to_keep, int):
        return slice(-logits_to_keep, None)
    return logits_to_keep


def family_class(family, which):
    """transformers class of a supported dense family: which in 0 config, 1 decoder, 2 causal LM."""
    if family not in FAMILIES:
        raise ValueError(f"dense family must be one of {sorted(FAMILIES)}, got {family!r}")
    return getattr(transformers, FAMILIES[family][which])


class DumeConfig(PreTrainedConfig):
    """Config of a DUME MoE: the dense config it was built from plus the routing settings.

    base_config: dict of the dense config (with its model_type); domains: one name per expert,
    in expert order; top_k / router_temperature: routing (logits / T, top-k, softmax over k);
    shared: how fastdume.upcycle made the non-expert weights ("mean" or "base:<dir>").
    """

    model_type = "dume"

    base_config: dict | None = None
    num_experts: int | None = None
    domains: list[str] | None = None
    top_k: int = 1
    router_temperature: float = 1.0
    dense_family: str | None = None
    shared: str = "mean"  # how the non-expert weights were made: "mean" or "base:<dir>"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.base_config is not None:
            self._adopt_base_config()
        super().__post_init__(**kwargs)

    def _adopt_base_config(self):
        base = self.base_config
        if isinstance(base, PreTrainedConfig):
            base = base.to_dict()
        base = {k: v for k, v in base.items() if k not in ("architectures", "transformers_version")}
        self.base_config = base
        family = base.get("model_type")
        if self.dense_family is None:
            self.dense_family = family
        if self.dense_family != family or family not in FAMILIES:
            raise ValueError(
                f"base_config['model_type'] must be one of {sorted(FAMILIES)} and equal "
                f"dense_family, got {family!r} and {self.dense_family!r}"
            )
        if base.get("mlp_bias"):
            raise ValueError("base_config has mlp_bias=True; DUME experts have no biases")
        if self.domains is None:
            n = self.num_experts or 1
            self.domains = [f"expert{i}" for i in range(n)]
        self.domains = [str(d) for d in self.domains]
        if self.num_experts is None:
            self.num_experts = len(self.domains)
        if len(self.domains) != self.num_experts or len(set(self.domains)) != len(self.domains):
            raise ValueError(
                f"domains must be {self.num_experts} distinct names, got {self.domains!r}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..{self.num_experts}, got {self.top_k}")
        if not self.router_temperature > 0:
            raise ValueError(f"router_temperature must be > 0, got {self.router_temperature}")
        self.router_temperature = float(self.router_temperature)
        # The LM-level fields (tying, special tokens) are the dense model's.
        self.tie_word_embeddings = bool(base.get("tie_word_embeddings", False))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) is None:
                setattr(self, name, base.get(name))

    def dense_config(self):
        """A fresh transformers config object of the dense family (same values as base_config)."""
        if self.base_config is None:
            raise ValueError("DumeConfig.base_config is not set")
        fields = {k: v for k, v in self.base_config.items() if k != "model_type"}
        config = family_class(self.dense_family, 0)(**fields)
        config._attn_implementation_internal = self._attn_implementation
        return config

    # The dense sizes, read-only, for code that asks any config for them (generation, HF utils).
    @property
    def hidden_size(self):
        return (self.base_config or {}).get("hidden_size")

    @property
    def num_hidden_layers(self):
        return (self.base_config or {}).get("num_hidden_layers")

    @property
    def vocab_size(self):
        return (self.base_config or {}).get("vocab_size")


class DumeRouter(nn.Linear):
    """nn.Linear(H, E, bias=True) whose parameters stay fp32 through .to()/.half()/.bfloat16()."""

    def _apply(self, fn, recurse=True):
        def keep_fp32(t):
            out = fn(t)
            if t.is_floating_point() and t.dtype == torch.float32 and out.dtype != torch.float32:
                return t.to(device=out.device)
            return out

        return super()._apply(keep_fp32, recurse)


class DumeExperts(nn.Module):
    """E SwiGLU MLPs as two 3-D tensors (transformers 5 layout, gate rows before up rows)."""

    def __init__(self, num_experts, hidden_size, intermediate_size):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """Same signature as transformers' experts modules: [T, H] rows with their routing."""
        return moe_experts(
            hidden_states, top_k_weights, top_k_index, self.gate_up_proj, self.down_proj
        )


class DumeMoE(nn.Module):
    """The MoE that replaces a dense MLP: fp32 linear router with bias, top-k, E experts."""

    def __init__(self, config, dense_config):
        super().__init__()
        if dense_config.hidden_act != "silu":
            raise ValueError(
                f"DUME experts are SwiGLU; hidden_act must be 'silu', got "
                f"{dense_config.hidden_act!r}"
            )
        hidden, inter = dense_config.hidden_size, dense_config.intermediate_size
        self.router = DumeRouter(hidden, config.num_experts, bias=True, dtype=torch.float32)
        self.experts = DumeExperts(config.num_experts, hidden, inter)
        self.top_k = config.top_k
        self.temperature = float(config.router_temperature)
        self.force_expert = None  # None: learned routing; int e: every token to expert e

    @property
    def num_experts(self):
        return self.experts.num_experts

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        if self.force_expert is None:
            out = fused_moe(
                x,
                self.router.weight,
                self.router.bias,
                gate_up,
                down,
                top_k=self.top_k,
                temperature=self.temperature,
            )
        else:
            ids = torch.full((x.shape[0], 1), self.force_expert, dtype=torch.long, device=x.device)
            weights = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
            out = moe_experts(x, weights, ids, gate_up, down, check_ids=False)
        return out.reshape(shape)

    def extra_repr(self):
        return (
            f"top_k={self.top_k}, temperature={self.temperature}, force_expert={self.force_expert}"
        )


class DumeGenerationConfig(GenerationConfig):
    """Generation defaults come from the dense config: DumeConfig.top_k is routing, not sampling."""

    @classmethod
    def from_model_config(cls, model_config):
        if isinstance(model_config, DumeConfig):
            model_config = model_config.dense_config()
        return super().from_model_config(model_config)


class DumePreTrainedModel(PreTrainedModel):
    config_class = DumeConfig
    generation_config_class = DumeGenerationConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["router"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DumeExperts):
            std = self.config.base_config.get("initializer_range", 0.02)
            hf_init.normal_(module.gate_up_proj, mean=0.0, std=std)
            hf_init.normal_(module.down_proj, mean=0.0, std=std)

    def initialize_weights(self):
        super().initialize_weights()
        # The family's decoder is itself a PreTrainedModel, so transformers initialises its
        # subtree with the family's _init_weights, which does not know the experts.
        for module in self.modules():
            if isinstance(module, DumeExperts):
                self._init_weights(module)


class DumeForCausalLM(DumePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        dense = config.dense_config()
        self.model = family_class(config.dense_family, 1)(dense)
        for layer in self.model.layers:
            layer.mlp = DumeMoE(config, dense)
        self.vocab_size = dense.vocab_size
        self.lm_head = nn.Linear(dense.hidden_size, dense.vocab_size, bias=False)
        self.post_init()

    def dume_layers(self):
        """The DumeMoE of every decoder layer, in layer order."""
        return [layer.mlp for layer in self.model.layers]

    @property
    def domains(self):
        return list(self.config.domains)

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE_ARG: past_key_values if cache is None else cache},
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state[:, _kept_positions(logits_to_keep), :]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


@contextlib.contextmanager
def forced_expert(model, expert):
    """Oracle routing: inside the block every layer sends every token to `expert` (weight 1).

    `expert` is an index or a domain name. The previous setting is restored on exit.
    """
    layers = model.dume_layers()
    if isinstance(expert, str):
        if expert not in model.config.domains:
            raise ValueError(f"expert must be one of {model.config.domains}, got {expert!r}")
        expert = model.config.domains.index(expert)
    num_experts = model.config.num_experts
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < num_experts:
        raise ValueError(f"expert must be an int in 0..{num_experts - 1}, got {expert!r}")
    previous = [layer.force_expert for layer in layers]
    for layer in layers:
        layer.force_expert = expert
    try:
        yield model
    finally:
        for layer, before in zip(layers, previous, strict=True):
            layer.force_expert = before


transformers.AutoConfig.register("dume", DumeConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(DumeConfig, DumeForCausalLM, exist_ok=True)
