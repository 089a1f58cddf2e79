"""Cut a causal LM into pipeline stages by decoder-layer ranges.

Works for any model shaped like the transformers decoder families (Llama, Mistral, Qwen2,
Qwen3, ...): `model.embed_tokens`, `model.layers`, `model.norm`, `model.rotary_emb`, `lm_head`.
A stage keeps the HF parameter names (`model.layers.7.mlp.up_proj.weight`), so hooks and
checkpoints address parameters exactly as in the full model's state dict.
"""

import copy

import torch
from torch import nn


def split_layers(num_layers, num_stages):
    """Contiguous (first, last + 1) layer ranges, as even as possible, earlier stages larger."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages must be in 1..{num_layers} (layers), got {num_stages}")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        end = start + base + (1 if s < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def stage_layers(num_layers, num_stages, stage):
    """Layer range of one stage (a `range`), as split_layers cuts it."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in 0..{num_stages - 1}, got {stage}")
    return range(*split_layers(num_layers, num_stages)[stage])


def stage_param_names(model, num_stages, stage):
    """Names (as in the HF state dict) of the parameters a stage holds.

    Decoder layers by range; the embeddings go to the first stage, the final norm and the
    head to the last (a tied head is the embedding and is listed under its own name once).
    """
    layers = stage_layers(len(model.model.layers), num_stages, stage)
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    names = []
    for name, _ in model.named_parameters():
        if name.startswith(prefixes):
            names.append(name)
        elif not name.startswith("model.layers."):
            first = name.startswith("model.embed_tokens.")
            if (first and stage == 0) or (not first and stage == num_stages - 1):
                names.append(name)
    return names


def _check_shape(model):
    inner = getattr(model, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if inner is None or not hasattr(inner, attr):
            raise ValueError(
                f"model must have model.{attr} (a transformers decoder LM), got "
                f"{type(model).__name__}"
            )
    if not hasattr(model, "lm_head"):
        raise ValueError(f"model must have lm_head, got {type(model).__name__}")


def is_tied(model):
    return model.lm_head.weight is model.model.embed_tokens.weight


class StageModule(nn.Module):
    """Layers [first, last) of a causal LM, plus embeddings (stage 0) / norm and head (last)."""

    def __init__(self, model, stage, num_stages, layer_range):
        super().__init__()
        _check_shape(model)
        self.stage, self.num_stages = stage, num_stages
        self.layer_range = tuple(layer_range)
        # the decoder's own config: a DUME model's top-level config wraps the dense one
        self.config = getattr(model.model, "config", model.config)
        self.tied = is_tied(model)
        first, last = stage == 0, stage == num_stages - 1
        inner = nn.Module()
        if first:
            inner.embed_tokens = model.model.embed_tokens
        inner.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in range(*layer_range)})
        inner.rotary_emb = model.model.rotary_emb
        if last:
            inner.norm = model.model.norm
        self.model = inner
        if last:
            head = model.lm_head
            if self.tied and not first:
                # The last stage holds its own copy of the tied matrix; the runtime sums the
                # gradients of both copies so they stay equal.
                head = copy.deepcopy(head)
            self.lm_head = head

    @property
    def is_first(self):
        return self.stage == 0

    @property
    def is_last(self):
        return self.stage == self.num_stages - 1

    def _masks(self, h, position_ids):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kw = dict(config=self.config, inputs_embeds=h, attention_mask=None)
        kw["position_ids"] = position_ids
        try:
            masks = {"full_attention": create_causal_mask(cache=None, **kw)}
        except TypeError:  # transformers releases that still call it past_key_values
            masks = {"full_attention": create_causal_mask(past_key_values=None, **kw)}
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or ()):
            try:
                masks["sliding_attention"] = create_sliding_window_causal_mask(cache=None, **kw)
            except TypeError:
                masks["sliding_attention"] = create_sliding_window_causal_mask(
                    past_key_values=None, **kw
                )
        return masks

    def forward(self, x):
        """x: input_ids [B, T] on the first stage, hidden states [B, T, H] elsewhere.
        Returns hidden states, or logits [B, T, V] on the last stage."""
        h = self.model.embed_tokens(x) if self.is_first else x
        position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        masks = self._masks(h, position_ids)
        pos_emb = self.model.rotary_emb(h, position_ids)
        types = getattr(self.config, "layer_types", None)
        for i in range(*self.layer_range):
            kind = types[i] if types else "full_attention"
            h = self.model.layers[str(i)](
                h,
                attention_mask=masks[kind],
                position_ids=position_ids,
                position_embeddings=pos_emb,
            )
            if isinstance(h, tuple):  # older decoder layers return (hidden, ...)
                h = h[0]
        if self.is_last:
            h = self.lm_head(self.model.norm(h))
        return h


def build_stage(model, stage, num_stages):
    """The StageModule of `stage` out of `num_stages` (even split of the decoder layers)."""
    _check_shape(model)
    ranges = split_layers(len(model.model.layers), num_stages)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in 0..{num_stages - 1}, got {stage}")
    return StageModule(model, stage, num_stages, ranges[stage])
