"""The DUME model: a dense Llama/Mistral/Qwen2/Qwen3 whose every MLP is a routed set of experts.

The dense family's own decoder (`XxxModel`) is built from the stored dense config and each
layer's MLP is swapped for a `DumeMoE`, so attention, norms, rotary embeddings, masks and the KV
cache are exactly the family's, and the state dict keeps the dense key names
(`model.layers.N.self_attn...`) next to `model.layers.N.mlp.router.*` / `.mlp.experts.*`.

routed="model" (fastdume.models.routed) instead swaps every Linear, Embedding and RMSNorm of the
family's decoder for a per-expert version ([E, ...] under the dense key names), adds the routers
(`routers.N.*`) and their fixed token table (`router_embed.weight`; none for the vocabulary
router, whose one router is [E, vocabulary]). Options other than the
paper's route through a RoutingState (fastdume.models.routing) shared by the model's modules.
"""

import contextlib

import torch
import transformers
from torch import nn
from transformers import (
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as hf_init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from fastdume.models import routing
from fastdume.models.routed import RoutedEmbedding, RoutedLinear, RoutedRMSNorm, route_whole_model
from fastdume.ops.moe import fused_moe, moe_experts

# transformers 5.2x renamed past_key_values to cache; the floor, 5.17, knows only the old name.
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# transformers 5.2x renamed gradient checkpointing to activation checkpointing
_CHECKPOINTING = (
    "is_activation_checkpointing"
    if hasattr(PreTrainedModel, "is_activation_checkpointing")
    else "is_gradient_checkpointing"
)

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
    shared: how fastdume.upcycle made the non-expert weights ("mean" or "base:<dir>"; "none"
    for routed="model", which shares nothing).
    routed / router_features / router_depth: the routing options of fastdume.models.routing
    (configs saved before they existed load as the paper's: "mlp", "token", "layer").
    """

    model_type = "dume"

    base_config: dict | None = None
    num_experts: int | None = None
    domains: list[str] | None = None
    top_k: int = 1
    router_temperature: float = 1.0
    dense_family: str | None = None
    shared: str = "mean"  # how the non-expert weights were made: "mean" or "base:<dir>"
    routed: str = "mlp"
    router_features: str = "token"
    router_depth: str = "layer"
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
        self.routed, self.router_features, self.router_depth = routing.check_options(
            self.routed, self.router_features, self.router_depth
        )
        if self.routed == "model" and self.top_k != 1:
            raise ValueError(
                f"top_k must be 1 for routed='model' (each token runs one expert's whole network; "
                f"mixing k networks is not defined), got {self.top_k}"
            )
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

    @property
    def num_routers(self):
        """Routers (RouterStats layers): one with depth="single", else one per layer."""
        return 1 if self.router_depth == "single" else self.num_hidden_layers


def _keep_fp32(fn):
    def apply(t):
        out = fn(t)
        if t.is_floating_point() and t.dtype == torch.float32 and out.dtype != torch.float32:
            return t.to(device=out.device)
        return out

    return apply


class DumeRouter(nn.Linear):
    """nn.Linear(H, E, bias=True) whose parameters stay fp32 through .to()/.half()/.bfloat16()."""

    def _apply(self, fn, recurse=True):
        return super()._apply(_keep_fp32(fn), recurse)


class DumeRouterEmbedding(nn.Embedding):
    """routed="model": the fixed token table router 0 reads (the mean of the experts' embeddings
    at upcycle time; never changed by add/remove, so statistics stay exact). Stays fp32."""

    def _apply(self, fn, recurse=True):
        return super()._apply(_keep_fp32(fn), recurse)


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

    def __init__(self, config, dense_config, index=0, state=None):
        super().__init__()
        if dense_config.hidden_act != "silu":
            raise ValueError(
                f"DUME experts are SwiGLU; hidden_act must be 'silu', got "
                f"{dense_config.hidden_act!r}"
            )
        hidden, inter = dense_config.hidden_size, dense_config.intermediate_size
        single = getattr(config, "router_depth", "layer") == "single"
        # depth="single": the model's one router decides; this layer has none of its own
        self.router = None
        if not single:
            self.router = DumeRouter(hidden, config.num_experts, bias=True, dtype=torch.float32)
        self.experts = DumeExperts(config.num_experts, hidden, inter)
        self.top_k = config.top_k
        self.temperature = float(config.router_temperature)
        self.force_expert = None  # None: learned routing; int e: every token to expert e
        # Other than the paper's options: decisions through the model's RoutingState.
        self.index, self.dume_state = index, state

    @property
    def num_experts(self):
        return self.experts.num_experts

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        if self.dume_state is not None:
            state = self.dume_state
            if self.router is None:  # depth="single": decided at the embeddings
                weights, ids = state.decision
            else:
                weights, ids = state.decide(self.index, hidden_states)
            out = moe_experts(x, weights, ids, gate_up, down, check_ids=False)
        elif self.force_expert is None:
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
        std = self.config.base_config.get("initializer_range", 0.02)
        if isinstance(module, DumeExperts):
            hf_init.normal_(module.gate_up_proj, mean=0.0, std=std)
            hf_init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, (RoutedLinear, RoutedEmbedding)):
            hf_init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, RoutedRMSNorm):
            hf_init.ones_(module.weight)

    def initialize_weights(self):
        super().initialize_weights()
        # The family's decoder is itself a PreTrainedModel, so transformers initialises its
        # subtree with the family's _init_weights, which does not know the experts.
        for module in self.modules():
            if isinstance(module, (DumeExperts, RoutedLinear, RoutedEmbedding, RoutedRMSNorm)):
                self._init_weights(module)


class DumeForCausalLM(DumePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        dense = config.dense_config()
        self.model = family_class(config.dense_family, 1)(dense)
        self.vocab_size = dense.vocab_size
        E, H, V = config.num_experts, dense.hidden_size, dense.vocab_size
        # routers of the non-paper options that are not inside an MoE (RouterStats order)
        self.routers = nn.ModuleList()
        vocab = routing.is_vocab(config.router_features)
        if config.routed == "model" or config.router_depth == "single":
            width = V if vocab else H  # the vocabulary router reads one-hot tokens
            for _ in range(config.num_routers):
                self.routers.append(DumeRouter(width, E, bias=True, dtype=torch.float32))
        self.dume_state = None if routing.is_paper(config) else routing.RoutingState(config, [])
        if config.routed == "model":
            if not vocab:
                self.router_embed = DumeRouterEmbedding(V, H)
            self.lm_head = RoutedLinear(E, H, V)
            self.lm_head.dume_state = self.dume_state
            deciding = range(1, config.num_routers)  # router 0 decides before the decoder runs
            route_whole_model(self.model, E, self.dume_state, set(deciding))
        else:
            for i, layer in enumerate(self.model.layers):
                layer.mlp = DumeMoE(config, dense, i, self.dume_state)
            self.lm_head = nn.Linear(H, V, bias=False)
        if self.dume_state is not None:
            self.dume_state.routers = self.dume_routers()
        self.post_init()

    def dume_layers(self):
        """The DumeMoE of every decoder layer, in layer order (none for routed="model")."""
        if self.config.routed == "model":
            return []
        return [layer.mlp for layer in self.model.layers]

    def dume_routers(self):
        """The router modules (nn.Linear H -> E, fp32) in RouterStats layer order."""
        if len(self.routers):
            return list(self.routers)
        return [moe.router for moe in self.dume_layers()]

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
        cache = past_key_values if cache is None else cache
        state = self.dume_state
        if state is not None:
            cache = self._begin_routing(input_ids, inputs_embeds, attention_mask, cache, use_cache)
        try:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **{CACHE_ARG: cache},
                **kwargs,
            )
            kept = _kept_positions(logits_to_keep)
            hidden_states = outputs.last_hidden_state[:, kept, :]
            if self.config.routed == "model":
                logits = self.lm_head(hidden_states, ids=state.ids[:, kept])
            else:
                logits = self.lm_head(hidden_states)
            new_cache = getattr(outputs, CACHE_ARG)
            if state is not None and new_cache is not None and state.context:
                new_cache.dume_context = state.context
        finally:
            if state is not None:
                state.end()
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_ARG: new_cache},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _begin_routing(self, input_ids, inputs_embeds, attention_mask, cache, use_cache):
        """Set up the RoutingState for this forward (mask, running-mean state from the cache)
        and make the decisions taken before the decoder runs. -> the cache to use."""
        config, state = self.config, self.dume_state
        if self.training and getattr(self, _CHECKPOINTING):
            raise ValueError(
                "gradient checkpointing re-runs layers after the forward, when the routing state "
                f"(routed={config.routed!r}, router_features={config.router_features!r}, "
                f"router_depth={config.router_depth!r}) is gone; disable it for these options"
            )
        vocab = routing.is_vocab(config.router_features)
        if input_ids is None and (config.routed == "model" or vocab or inputs_embeds is None):
            raise ValueError(
                f"input_ids are required by routed={config.routed!r}, "
                f"router_features={config.router_features!r} (got inputs_embeds only)"
            )
        shape = (input_ids if input_ids is not None else inputs_embeds[..., 0]).shape
        if use_cache is None:
            use_cache = self.model.config.use_cache
        if use_cache and cache is None:  # made here so the running mean can travel with it
            cache = DynamicCache(config=self.model.config)
        past = cache.get_seq_length() if cache is not None else 0
        context = getattr(cache, "dume_context", None) if past else None
        if past and context is None and state.half_life is not None:
            raise ValueError(
                f"the cache holds {past} tokens but no running-mean state (cache.dume_context) "
                f"for router_features={config.router_features!r}; continue from the cache this "
                "model returned"
            )
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if attention_mask is None:
            mask = torch.ones(shape, dtype=torch.bool, device=device)
        else:
            mask = attention_mask[:, -shape[1] :].bool()
        state.begin(mask, context)
        if vocab:
            state.decide_tokens(input_ids)
        elif config.routed == "model":
            state.decide(0, self.router_embed(input_ids))
        elif config.router_depth == "single":
            x = inputs_embeds if inputs_embeds is not None else self.model.embed_tokens(input_ids)
            state.decide(0, x)
        return cache


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
    state = model.dume_state
    before_state = None if state is None else state.force
    for layer in layers:
        layer.force_expert = expert
    if state is not None:
        state.force = expert
    try:
        yield model
    finally:
        for layer, before in zip(layers, previous, strict=True):
            layer.force_expert = before
        if state is not None:
            state.force = before_state


transformers.AutoConfig.register("dume", DumeConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(DumeConfig, DumeForCausalLM, exist_ok=True)
