"""upcycle: merge dense domain experts of one family into a DUME model, tensor by tensor.

Every layer's MLP of expert e becomes expert e of that layer's DumeMoE; every other tensor is
the unweighted mean over the experts (shared="mean", the paper) or the base model's tensor
(shared="base:<dir>", which keeps router statistics exact when experts are added later).
Checkpoints are read one tensor at a time from safetensors, so the peak memory is the result
plus one tensor per expert being merged (plus one fp32 accumulator), never whole experts.
Routers start at zero (every token goes to expert 0) until fastdume.fit_router sets them.
With routed="model" nothing is merged: every tensor is stacked over the experts.
"""

import os
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from fastdume.merge.sources import check_configs, check_tensors, check_vocabularies, open_sources
from fastdume.models.modeling import DumeConfig, DumeForCausalLM, family_class
from fastdume.models.routing import check_options


def _mlp_key(layer, part):
    return f"model.layers.{layer}.mlp.{part}.weight"


def dense_layout(config):
    """name -> shape of every tensor a dense checkpoint of `config` must hold."""
    with torch.device("meta"):
        model = family_class(config.model_type, 2)(config)
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        layout.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    return layout


def _default_domains(sources):
    """Directory names; where two directories share a name (runs/a/final, runs/b/final), the
    shortest path suffix that tells them apart (a/final, b/final). Models: expert<i>."""
    names = []
    for i, s in enumerate(sources):
        if s.path_parts is None:
            names.append(f"expert{i}")
            continue
        others = [o.path_parts for o in sources if o is not s and o.path_parts is not None]
        distinct = (
            n
            for n in range(1, len(s.path_parts) + 1)
            if all(o[-n:] != s.path_parts[-n:] for o in others)
        )
        # the same directory twice has no distinguishing suffix: its name, and the clash is reported
        names.append("/".join(s.path_parts[-next(distinct, 1) :]))
    return names


def _check_domains(domains, count):
    if isinstance(domains, str) or len(domains) != count:
        raise ValueError(
            f"domains must be a list of {count} names (one per expert), got {domains!r}"
        )
    seen = set()
    for name in domains:
        if not isinstance(name, str) or not name:
            raise ValueError(f"domains must be non-empty strings, got {name!r}")
        if name in seen:
            raise ValueError(f"domain name {name!r} is used twice in domains={list(domains)}")
        seen.add(name)


def _parse_shared(shared):
    if shared == "mean":
        return None
    if isinstance(shared, str) and shared.startswith("base:") and len(shared) > 5:
        return shared[5:]
    raise ValueError(f"shared must be 'mean' or 'base:<dir>', got {shared!r}")


def _empty_model(config, dtype):
    """The DUME model with uninitialised storage (routers fp32), allocated once in `dtype`."""
    with torch.device("meta"):
        model = DumeForCausalLM(config)
    model.to(dtype)  # on meta: free; the routers stay fp32
    model.to_empty(device="cpu")
    # Non-persistent buffers (rotary frequencies) are computed by the constructor: rebuild them.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.model.config)
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def _fill_routed(model, sources, layout, bar):
    """routed="model": every dense tensor stacked over the experts ([E, ...]); the routers'
    token table is the mean of the experts' embeddings (fixed from now on)."""
    target = model.state_dict()
    for key in layout:
        bar.update()
        for e, source in enumerate(sources):
            target[key][e].copy_(source.get(key))
    if hasattr(model, "router_embed"):  # none for the vocabulary router
        embed = target["model.embed_tokens.weight"]
        model.router_embed.weight.copy_(embed.to(torch.float32).mean(dim=0))
    for router in model.dume_routers():
        router.weight.zero_()
        router.bias.zero_()


@torch.no_grad()
def _fill_shared(target, sources, shared_source, layout, bar):
    for key in layout:
        if ".mlp." in key:
            continue
        bar.update()
        if shared_source is not None:
            target[key].copy_(shared_source.get(key))
            continue
        # fp32 running sum, one expert's tensor at a time; a copy, as model sources lend
        # their own tensors
        total = sources[0].get(key).to(torch.float32, copy=True)
        for source in sources[1:]:
            total.add_(source.get(key))
        target[key].copy_(total.div_(len(sources)))


@torch.no_grad()
def _fill_experts(model, sources, bar):
    inter = model.model.config.intermediate_size
    for layer, moe in enumerate(model.dume_layers()):
        bar.update()
        gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
        for e, source in enumerate(sources):
            gate_up[e, :inter].copy_(source.get(_mlp_key(layer, "gate_proj")))
            gate_up[e, inter:].copy_(source.get(_mlp_key(layer, "up_proj")))
            down[e].copy_(source.get(_mlp_key(layer, "down_proj")))
    for router in model.dume_routers():
        router.weight.zero_()
        router.bias.zero_()


def _check_routed(routed, shared, top_k):
    """routed="model" shares nothing, so `shared` has no meaning there; nor has top_k > 1."""
    if routed == "model" and shared != "mean":
        raise ValueError(
            f"shared must be left at its default for routed='model' (every tensor is kept per "
            f"expert, nothing is shared), got shared={shared!r}"
        )
    if routed == "model" and top_k != 1:
        raise ValueError(f"top_k must be 1 for routed='model', got {top_k!r}")


def upcycle(
    experts,
    domains=None,
    shared="mean",
    dtype=None,
    routed="mlp",
    features=None,
    depth=None,
    top_k=1,
    temperature=1.0,
    progress=None,
):
    """Merge dense experts (HF directories or PreTrainedModel objects) into a DumeForCausalLM.

    experts: list of E >= 1 models of one family (Llama, Mistral, Qwen2, Qwen3) and one config,
    or a dict domain -> model (then the keys are the domains).
    domains: one distinct name per expert (default: directory names, else "expert<i>").
    shared: "mean" | "base:<dir>" (routed="mlp" only). dtype: result dtype (default: the
    first expert's).
    routed: "mlp" (the paper: MLPs are experts, the rest shared) | "model" (every tensor kept
    per expert; a token runs its expert's whole network; top_k must be 1).
    features: "token" | "context" | "context:<half-life>" (ridge on hidden states) | "vocab" |
    "vocab:<half-life>" (naive Bayes on the tokens, depth "single" only); depth: "layer" |
    "cumulative" | "single"; None = the measured default of that `routed`
    (fastdume.models.routing.DEFAULTS; routed="mlp": the paper's token/layer; routed="model":
    vocab:16/single). See fastdume.models.routing.
    top_k, temperature: routing settings stored in the config. progress: show a progress bar
    (None: only on a terminal).
    Everything is checked before any tensor is merged; a mismatch raises ValueError naming the
    first differing config field, tensor name or shape, or tokenizer entry.
    """
    if isinstance(experts, Mapping):
        if domains is not None:
            raise ValueError(
                "domains must be None when experts is a dict (its keys are the domains)"
            )
        domains, experts = list(experts.keys()), list(experts.values())
    if isinstance(experts, (str, bytes)) or not hasattr(experts, "__len__") or not experts:
        raise ValueError(
            f"experts must be a non-empty list of directories or models, got {experts!r}"
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    routed, features, depth = check_options(routed, features, depth)
    _check_routed(routed, shared, top_k)
    base_dir = _parse_shared(shared)
    with open_sources(experts, base_dir) as (sources, base):
        # The experts themselves first: a shape mismatch matters more than a name clash.
        config = check_configs(sources, base)
        check_vocabularies(sources, base)
        layout = dense_layout(config)
        check_tensors(sources, base, layout)
        domains = list(domains) if domains is not None else _default_domains(sources)
        _check_domains(domains, len(sources))
        dtype = dtype or sources[0].dtype or torch.float32
        dume_config = DumeConfig(
            base_config=config.to_dict(),
            domains=domains,
            top_k=top_k,
            router_temperature=temperature,
            shared=_shared_name(routed, base, base_dir),
            routed=routed,
            router_features=features,
            router_depth=depth,
        )
        model = _empty_model(dume_config, dtype)
        disable = None if progress is None else not progress  # None: tqdm's "not a terminal"
        if routed == "model":
            with tqdm(total=len(layout), desc="upcycle", unit="tensor", disable=disable) as bar:
                _fill_routed(model, sources, layout, bar)
            return model
        steps = sum(".mlp." not in k for k in layout) + config.num_hidden_layers
        with tqdm(total=steps, desc="upcycle", unit="tensor", disable=disable) as bar:
            _fill_shared(model.state_dict(), sources, base, layout, bar)
            _fill_experts(model, sources, bar)
    return model


def _shared_name(routed, base, base_dir):
    if routed == "model":
        return "none"
    return "mean" if base is None else f"base:{os.path.abspath(base_dir)}"
