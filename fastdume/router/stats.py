"""Router statistics: RouterStats (storage, file format, reduction over ranks).

For every domain e and layer l we keep the sufficient statistics of the MoE input x under oracle
routing: G = X^T X (lower triangle only), s = sum of x, n = token count. The bias-augmented
ridge system of the reference is assembled from them at solve time, so neither [x, 1] nor a
one-hot target matrix is ever built. The vocabulary router (features "vocab") reads one-hot
tokens: its statistics are s = the domain's token counts [1, V] and n, with no G (its naive-Bayes
fit needs none, and a V x V matrix would not fit in memory).

Precision: each update forms its X^T X in fp32 (the GEMM rate) and adds it into an fp64 store,
so rounding stays at the level of one batch's product instead of growing with the number of
batches (benches/bench_router.py and tests/test_router.py measure it on 10M tokens).
"""

import json
import os

import torch
from safetensors import safe_open

from fastdume._atomic import save_safetensors
from fastdume.models.routing import PAPER_OPTIONS, is_vocab
from fastdume.ops.gram import gram_accumulate, symmetrize
from fastdume.router.fingerprint import check_model

FORMAT = "fastdume.router_stats"
FORMAT_VERSION = 1
STORE = torch.float64


class RouterStats:
    """Per-domain, per-layer (G lower triangle, s, n) of the MoE inputs, in fp64.

    domains: the domain names this object holds (more are added by `+=` / collect_stats).
    fingerprint: hash of the shared weights of the model the statistics were taken on (None when
    unknown); statistics of different fingerprints never mix.
    options: the routing options of that model ({"routed", "features", "depth"}; None when
    unknown); "layers" are its routers (one for depth="single"). Files written before the
    options existed load as the paper's.
    """

    def __init__(
        self, num_layers, hidden_size, domains, fingerprint=None, device=None, options=None
    ):
        for name, value in (("num_layers", num_layers), ("hidden_size", hidden_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(domains, str):
            raise ValueError(f"domains must be a list of names, got the string {domains!r}")
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.fingerprint = fingerprint
        self.options = None if options is None else dict(options)
        self.device = torch.device(device or "cpu")
        self.has_gram = not (self.options and is_vocab(self.options["features"]))
        self._gram, self._sum, self._count = {}, {}, {}
        for domain in domains:
            if domain in self._count:
                raise ValueError(f"domains must be distinct, got {domain!r} twice in {domains}")
            self._allocate(domain)

    def _allocate(self, domain):
        if not isinstance(domain, str) or not domain:
            raise ValueError(f"a domain must be a non-empty str, got {domain!r}")
        L, H = self.num_layers, self.hidden_size
        if self.has_gram:
            self._gram[domain] = torch.zeros(L, H, H, dtype=STORE, device=self.device)
        self._sum[domain] = torch.zeros(L, H, dtype=STORE, device=self.device)
        self._count[domain] = torch.zeros(L, dtype=torch.int64, device=self.device)

    @property
    def domains(self):
        return list(self._count)

    def _stores(self):
        return (self._gram, self._sum, self._count) if self.has_gram else (self._sum, self._count)

    def _domain(self, domain):
        if domain not in self._count:
            raise ValueError(f"domain must be one of {self.domains}, got {domain!r}")
        return domain

    def lower(self, domain):
        """Stored lower triangle of X^T X of `domain` (upper part unspecified): [L, H, H] fp64."""
        self._need_gram()
        return self._gram[self._domain(domain)]

    def _need_gram(self):
        if not self.has_gram:
            raise ValueError(
                "these statistics are the vocabulary router's token counts (features "
                f"{self.options['features']!r}); they hold no Gram matrix"
            )

    def gram(self, domain):
        """Full symmetric X^T X of `domain`: [L, H, H] fp64."""
        return symmetrize(self.lower(domain))

    def colsum(self, domain):
        """Sum of the MoE inputs of `domain` (vocabulary router: token counts): [L, H] fp64."""
        return self._sum[self._domain(domain)]

    def count(self, domain):
        """Tokens per layer of `domain`: [L] int64."""
        return self._count[self._domain(domain)]

    def tokens(self, domain):
        """Tokens seen by `domain` (the largest per-layer count)."""
        return int(self.count(domain).max())

    def update(self, layer, hidden_states, domain, mask=None):
        """Add MoE inputs of one layer: hidden_states [N, H] or [B, S, H], mask [N] / [B, S].

        Returns the number of tokens added. NaN/Inf input raises before anything is added.
        """
        self._domain(domain)
        self._need_gram()
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer must be an int, got {layer!r}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in 0..{self.num_layers - 1}, got {layer}")
        x, mask = _flatten(hidden_states, mask, self.hidden_size)
        x = x.to(self.device)
        mask = None if mask is None else mask.to(self.device)
        gram, colsum = self._gram[domain][layer], self._sum[domain][layer]
        try:
            # gram_accumulate checks finiteness before it touches the store.
            added = gram_accumulate(x, gram, colsum, mask, precision="fp32")
        except ValueError as err:
            if "NaN or Inf" not in str(err):
                raise
            raise ValueError(
                f"hidden_states for domain {domain!r}, layer {layer} contain NaN or Inf"
            ) from None
        self._count[domain][layer] += added
        return added

    def update_tokens(self, input_ids, domain, mask=None):
        """Vocabulary router: add the counts of input_ids [B, S] (mask [B, S]: False = skip).
        Returns the number of tokens added."""
        self._domain(domain)
        if self.has_gram:
            raise ValueError("update_tokens is for the vocabulary router's statistics; use update")
        ids = input_ids.reshape(-1).to(self.device)
        if mask is not None:
            if tuple(mask.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"mask must have shape {tuple(input_ids.shape)}, got {tuple(mask.shape)}"
                )
            ids = ids[mask.reshape(-1).bool().to(self.device)]
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.hidden_size:
            raise ValueError(f"input_ids must be in 0..{self.hidden_size - 1} (the vocabulary)")
        counts = torch.bincount(ids, minlength=self.hidden_size).to(STORE)
        self._sum[domain][0] += counts
        self._count[domain][0] += ids.numel()
        return ids.numel()

    # --- combining -------------------------------------------------------------------------

    def _check_compatible(self, other, what="other"):
        if not isinstance(other, RouterStats):
            raise TypeError(f"{what} must be RouterStats, got {type(other).__name__}")
        mine = (self.num_layers, self.hidden_size)
        theirs = (other.num_layers, other.hidden_size)
        if mine != theirs:
            raise ValueError(f"{what} has (num_layers, hidden_size) = {theirs}, expected {mine}")
        if self.has_gram != other.has_gram:
            raise ValueError(
                f"{what} holds {'hidden-state statistics' if other.has_gram else 'token counts'}, "
                f"these hold {'hidden-state statistics' if self.has_gram else 'token counts'}"
            )
        if None not in (self.options, other.options) and self.options != other.options:
            raise ValueError(
                f"{what} was collected with routing options {other.options}, expected "
                f"{self.options}"
            )
        if None not in (self.fingerprint, other.fingerprint) and (
            self.fingerprint != other.fingerprint
        ):
            raise ValueError(
                f"{what} was collected on a model with other shared weights (fingerprint "
                f"{other.fingerprint[:12]}..., expected {self.fingerprint[:12]}...)"
            )

    def __iadd__(self, other):
        self._check_compatible(other)
        for domain in other.domains:
            if domain not in self._count:
                self._allocate(domain)
            for mine, theirs in zip(self._stores(), other._stores(), strict=True):
                mine[domain] += theirs[domain].to(self.device)
        self.fingerprint = self.fingerprint or other.fingerprint
        self.options = self.options or other.options
        return self

    def __add__(self, other):
        result = self.copy()
        result += other
        return result

    def copy(self):
        result = self._empty()
        result += self
        return result

    def _empty(self):
        return RouterStats(
            self.num_layers, self.hidden_size, [], self.fingerprint, self.device, self.options
        )

    def select(self, domains):
        """A new RouterStats with only `domains` (in that order)."""
        result = self._empty()
        for domain in domains:
            self._domain(domain)
            result._allocate(domain)
            for mine, theirs in zip(result._stores(), self._stores(), strict=True):
                mine[domain] += theirs[domain]
        return result

    def remove(self, domain):
        """Drop `domain` in place."""
        self._domain(domain)
        for store in self._stores():
            del store[domain]
        return self

    def all_reduce(self, group=None):
        """Sum the statistics of every rank in place (no-op unless torch.distributed is up).

        Every rank must hold the same domains in the same order.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = self.device
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        for store in self._stores():
            for domain, tensor in store.items():
                buf = tensor.to(device)
                dist.all_reduce(buf, group=group)
                store[domain] = buf.to(self.device)
        return self

    # --- files -----------------------------------------------------------------------------

    def save(self, path):
        """Write a safetensors file (lower triangles packed); temp name, then rename."""
        path = os.fspath(path)
        rows, cols = (
            torch.tril_indices(self.hidden_size, self.hidden_size)
            if self.has_gram
            else (None, None)
        )
        tensors = {}
        for i, domain in enumerate(self.domains):
            if self.has_gram:
                tensors[f"gram.{i}"] = self._gram[domain][:, rows, cols].cpu().contiguous()
            tensors[f"sum.{i}"] = self._sum[domain].cpu().contiguous()
            tensors[f"count.{i}"] = self._count[domain].cpu().contiguous()
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "num_layers": str(self.num_layers),
            "hidden_size": str(self.hidden_size),
            "domains": json.dumps(self.domains),
            "token_counts": json.dumps({d: self.tokens(d) for d in self.domains}),
            "fingerprint": self.fingerprint or "",
        }
        for key, value in (self.options or {}).items():
            metadata[f"routing_{key}"] = value
        return save_safetensors(path, tensors, metadata)

    @classmethod
    def load(cls, path, model=None, device=None):
        """Read a file written by `save`. With `model`, check it was made on that model."""
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except FileNotFoundError:
            raise
        except Exception as err:  # safetensors raises its own error type for broken files
            raise ValueError(
                f"{path} is not a readable router statistics file "
                f"(truncated or not safetensors): {err}"
            ) from err
        _check_metadata(path, meta)
        L, H = int(meta["num_layers"]), int(meta["hidden_size"])
        options = {k: meta.get(f"routing_{k}", PAPER_OPTIONS[k]) for k in PAPER_OPTIONS}
        fingerprint = meta["fingerprint"] or None
        stats = cls(L, H, json.loads(meta["domains"]), fingerprint, device, options)
        rows, cols = torch.tril_indices(H, H) if stats.has_gram else (None, None)
        for i, domain in enumerate(stats.domains):
            if stats.has_gram:
                packed = _get(tensors, f"gram.{i}", (L, rows.numel()), path)
                stats._gram[domain][:, rows, cols] = packed.to(stats.device, STORE)
            stats._sum[domain] += _get(tensors, f"sum.{i}", (L, H), path).to(stats.device)
            stats._count[domain] += _get(tensors, f"count.{i}", (L,), path).to(stats.device)
        if model is not None:
            check_model(stats, model, what=f"statistics file {path}")
        return stats

    def __repr__(self):
        counts = ", ".join(f"{d}: {self.tokens(d)}" for d in self.domains)
        return (
            f"RouterStats(num_layers={self.num_layers}, hidden_size={self.hidden_size}, "
            f"tokens={{{counts}}})"
        )


def _flatten(hidden_states, mask, hidden_size):
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden_states must be [N, {hidden_size}] or [B, S, {hidden_size}], "
            f"got shape {tuple(hidden_states.shape)}"
        )
    x = hidden_states.reshape(-1, hidden_size)
    if mask is not None:
        if tuple(mask.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(
                f"mask must have shape {tuple(hidden_states.shape[:-1])}, got {tuple(mask.shape)}"
            )
        mask = mask.reshape(-1).bool()
    return x, mask


def _check_metadata(path, meta):
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a fastdume router statistics file "
            f"(metadata format={meta.get('format')!r}, expected {FORMAT!r})"
        )
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{path}: router statistics format version {meta.get('format_version')!r} is not "
            f"supported (expected {FORMAT_VERSION})"
        )
    for key in ("num_layers", "hidden_size", "domains", "fingerprint"):
        if key not in meta:
            raise ValueError(f"{path}: router statistics metadata lacks {key!r}")


def _get(tensors, key, shape, path):
    if key not in tensors or tuple(tensors[key].shape) != shape:
        got = tuple(tensors[key].shape) if key in tensors else "missing"
        raise ValueError(f"{path}: router statistics tensor {key} should be {shape}, got {got}")
    return tensors[key]
