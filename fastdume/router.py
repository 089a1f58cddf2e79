"""Router statistics and the closed-form router fit (DUME).

For every domain e and layer l we keep the sufficient statistics of the MoE input x under oracle
routing: G = X^T X (lower triangle only), s = sum of x, n = token count. The bias-augmented
ridge system of the reference is assembled from them at solve time, so neither [x, 1] nor a
one-hot target matrix is ever built.

Precision: each update forms its X^T X in fp32 (the GEMM rate) and adds it into an fp64 store,
so rounding stays at the level of one batch's product instead of growing with the number of
batches (benches/bench_router.py and tests/test_router.py measure it on 10M tokens).
"""

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastdume.ops.gram import gram_accumulate, symmetrize
from fastdume.ops.ridge import ridge_solve

FORMAT = "fastdume.router_stats"
FORMAT_VERSION = 1
LAM_MODES = ("absolute", "trace")
_STORE = torch.float64


class RouterStats:
    """Per-domain, per-layer (G lower triangle, s, n) of the MoE inputs, in fp64.

    domains: the domain names this object holds (more are added by `+=` / collect_stats).
    fingerprint: hash of the shared weights of the model the statistics were taken on (None when
    unknown); statistics of different fingerprints never mix.
    """

    def __init__(self, num_layers, hidden_size, domains, fingerprint=None, device=None):
        for name, value in (("num_layers", num_layers), ("hidden_size", hidden_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(domains, str):
            raise ValueError(f"domains must be a list of names, got the string {domains!r}")
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.fingerprint = fingerprint
        self.device = torch.device(device or "cpu")
        self._gram, self._sum, self._count = {}, {}, {}
        for domain in domains:
            if domain in self._gram:
                raise ValueError(f"domains must be distinct, got {domain!r} twice in {domains}")
            self._allocate(domain)

    def _allocate(self, domain):
        if not isinstance(domain, str) or not domain:
            raise ValueError(f"a domain must be a non-empty str, got {domain!r}")
        L, H = self.num_layers, self.hidden_size
        self._gram[domain] = torch.zeros(L, H, H, dtype=_STORE, device=self.device)
        self._sum[domain] = torch.zeros(L, H, dtype=_STORE, device=self.device)
        self._count[domain] = torch.zeros(L, dtype=torch.int64, device=self.device)

    @property
    def domains(self):
        return list(self._gram)

    def _domain(self, domain):
        if domain not in self._gram:
            raise ValueError(f"domain must be one of {self.domains}, got {domain!r}")
        return domain

    def gram(self, domain):
        """Full symmetric X^T X of `domain`: [L, H, H] fp64."""
        return symmetrize(self._gram[self._domain(domain)])

    def colsum(self, domain):
        """Sum of the MoE inputs of `domain`: [L, H] fp64."""
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

    # --- combining -------------------------------------------------------------------------

    def _check_compatible(self, other, what="other"):
        if not isinstance(other, RouterStats):
            raise TypeError(f"{what} must be RouterStats, got {type(other).__name__}")
        mine = (self.num_layers, self.hidden_size)
        theirs = (other.num_layers, other.hidden_size)
        if mine != theirs:
            raise ValueError(f"{what} has (num_layers, hidden_size) = {theirs}, expected {mine}")
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
            if domain not in self._gram:
                self._allocate(domain)
            self._gram[domain] += other._gram[domain].to(self.device)
            self._sum[domain] += other._sum[domain].to(self.device)
            self._count[domain] += other._count[domain].to(self.device)
        self.fingerprint = self.fingerprint or other.fingerprint
        return self

    def __add__(self, other):
        result = self.copy()
        result += other
        return result

    def copy(self):
        result = RouterStats(self.num_layers, self.hidden_size, [], self.fingerprint, self.device)
        result += self
        return result

    def select(self, domains):
        """A new RouterStats with only `domains` (in that order)."""
        result = RouterStats(self.num_layers, self.hidden_size, [], self.fingerprint, self.device)
        for domain in domains:
            self._domain(domain)
            result._allocate(domain)
            result._gram[domain] += self._gram[domain]
            result._sum[domain] += self._sum[domain]
            result._count[domain] += self._count[domain]
        return result

    def remove(self, domain):
        """Drop `domain` in place."""
        self._domain(domain)
        for store in (self._gram, self._sum, self._count):
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
        for store in (self._gram, self._sum, self._count):
            for domain, tensor in store.items():
                buf = tensor.to(device)
                dist.all_reduce(buf, group=group)
                store[domain] = buf.to(self.device)
        return self

    # --- files -----------------------------------------------------------------------------

    def save(self, path):
        """Write a safetensors file (lower triangles packed); temp name, then rename."""
        path = os.fspath(path)
        rows, cols = torch.tril_indices(self.hidden_size, self.hidden_size)
        tensors = {}
        for i, domain in enumerate(self.domains):
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
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return path

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
        stats = cls(L, H, json.loads(meta["domains"]), meta["fingerprint"] or None, device)
        rows, cols = torch.tril_indices(H, H)
        for i, domain in enumerate(stats.domains):
            packed = _get(tensors, f"gram.{i}", (L, rows.numel()), path)
            stats._gram[domain][:, rows, cols] = packed.to(stats.device, _STORE)
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


# --- models ------------------------------------------------------------------------------------


def _router_shape(model):
    layers = model.dume_layers()
    if not layers:
        raise ValueError("model has no DumeMoE layers (expected a DumeForCausalLM)")
    return len(layers), layers[0].router.weight.shape[1]


def shared_fingerprint(model, sample=4096):
    """Hash of the model's shared (non-expert, non-router) weights.

    Each tensor contributes its name, shape and an evenly strided sample of at most `sample`
    values rounded to bf16, so the hash is cheap for any model size and the same for the model
    loaded in fp32, bf16 or on another device.
    """
    skip = set()
    for layer in model.dume_layers():
        skip.update(id(p) for p in layer.experts.parameters())
        skip.update(id(p) for p in layer.router.parameters())
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if id(param) in skip:
            continue
        flat = param.detach().reshape(-1)
        picked = flat[:: max(1, math.ceil(flat.numel() / sample))]
        values = picked.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()
        digest.update(f"{name}:{tuple(param.shape)}:".encode())
        digest.update(values)
    return digest.hexdigest()


def check_model(stats, model, what="stats"):
    """Raise unless `stats` were taken on a model of this size and these shared weights."""
    num_layers, hidden = _router_shape(model)
    if (stats.num_layers, stats.hidden_size) != (num_layers, hidden):
        raise ValueError(
            f"{what} has (num_layers, hidden_size) = {(stats.num_layers, stats.hidden_size)}, "
            f"but the model has {(num_layers, hidden)}"
        )
    if stats.fingerprint is not None:
        mine = shared_fingerprint(model)
        if stats.fingerprint != mine:
            raise ValueError(
                f"{what} was collected on a model with other shared weights (fingerprint "
                f"{stats.fingerprint[:12]}..., this model {mine[:12]}...)"
            )


# --- collection --------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised after the last MoE input is captured: the rest of the forward is not needed."""


def _as_batch(batch, device):
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"a batch dict needs 'input_ids', got keys {sorted(batch)}")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    elif isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    else:
        raise TypeError(f"batches must yield dicts or tensors, got {type(batch).__name__}")
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(ids.shape)}")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
    return ids.to(device), mask.to(device)


def _token_mask(mask, skip_first_token, budget):
    keep = mask.bool()
    if skip_first_token:
        first = (keep.long().cumsum(dim=1) == 1) & keep
        keep = keep & ~first
    if budget is not None:
        # Keep the first `budget` kept tokens in row-major order.
        keep = keep & (keep.reshape(-1).long().cumsum(0) <= budget).reshape(keep.shape)
    return keep


def _rank_budget(max_tokens):
    if max_tokens is None:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return math.ceil(max_tokens / dist.get_world_size())
    return max_tokens


def _is_main_rank():
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _collect_local(model, domain, batches, budget, skip_first_token, local, progress):
    from fastdume.moe import forced_expert

    expert = list(model.config.domains).index(domain)
    layers = model.dume_layers()
    device = next(model.parameters()).device
    state = {"mask": None}

    def make_hook(index):
        def hook(module, args):
            local.update(index, args[0].reshape(state["mask"].shape + (-1,)), domain, state["mask"])
            if index == len(layers) - 1:
                raise _StopForward

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i)) for i, layer in enumerate(layers)]
    bar = _progress(progress, budget, domain)
    seen = 0
    try:
        with torch.no_grad(), forced_expert(model, expert):
            for batch in batches:
                ids, mask = _as_batch(batch, device)
                state["mask"] = _token_mask(mask, skip_first_token, _left(budget, seen))
                added = int(state["mask"].sum())
                if added:
                    with contextlib.suppress(_StopForward):
                        model(input_ids=ids, attention_mask=mask, use_cache=False)
                    seen += added
                    bar.update(added)
                if budget is not None and seen >= budget:
                    break
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    return seen


def _left(budget, seen):
    return None if budget is None else budget - seen


def _progress(progress, total, domain):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=f"stats {domain}",
        disable=not (progress and _is_main_rank()),
    )


def collect_stats(
    model, domain, batches, max_tokens=None, skip_first_token=False, stats=None, progress=True
):
    """Statistics of one domain's data, with every layer forced to that domain's expert.

    batches: iterable of dicts with "input_ids" [B, S] and optional "attention_mask" [B, S]
    (padding excluded), or of input_ids tensors. All layers are captured in one forward pass.
    max_tokens: bound on the tokens used (across ranks under torch.distributed).
    stats: an existing RouterStats of this model to extend in place (more tokens or a new
    domain); otherwise a new one holding just `domain` is returned.
    Under torch.distributed each rank passes its own shard and the result is summed over ranks.
    """
    domains = list(model.config.domains)
    if domain not in domains:
        raise ValueError(f"domain must be one of the model's domains {domains}, got {domain!r}")
    budget = _rank_budget(max_tokens)
    num_layers, hidden = _router_shape(model)
    fingerprint = shared_fingerprint(model)
    if stats is not None:
        check_model(stats, model)
    device = next(model.parameters()).device
    local = RouterStats(num_layers, hidden, [domain], fingerprint, device=device)
    was_training = model.training
    model.eval()
    try:
        _collect_local(model, domain, batches, budget, skip_first_token, local, progress)
    finally:
        model.train(was_training)
    local.all_reduce()
    if local.tokens(domain) == 0:
        raise ValueError(f"no tokens collected for domain {domain!r}: batches are empty or masked")
    if stats is None:
        return local
    stats += local
    stats.fingerprint = fingerprint
    return stats


# --- solve -------------------------------------------------------------------------------------


def _solve_inputs(stats, domains, fit_intercept, balance):
    """(A [L, n, n], B [L, n, E]) of the (optionally bias-augmented) ridge system, fp64."""
    L, H = stats.num_layers, stats.hidden_size
    n = H + 1 if fit_intercept else H
    device = stats.device
    lower = torch.zeros(L, H, H, dtype=_STORE, device=device)
    A = torch.zeros(L, n, n, dtype=_STORE, device=device)
    B = torch.zeros(L, n, len(domains), dtype=_STORE, device=device)
    for e, domain in enumerate(domains):
        count = stats.count(domain).to(_STORE)
        if bool((count == 0).any()):
            raise ValueError(f"statistics of domain {domain!r} have zero tokens; collect some")
        w = (1.0 / count if balance else torch.ones_like(count))[:, None]
        lower += stats._gram[domain] * w[..., None]
        B[:, :H, e] = stats.colsum(domain) * w
        if fit_intercept:
            B[:, H, e] = count * w[:, 0]
            A[:, H, :H] += stats.colsum(domain) * w
            A[:, H, H] += count * w[:, 0]
    A[:, :H, :H] = symmetrize(lower)
    if fit_intercept:
        A[:, :H, H] = A[:, H, :H]
    return A, B


def solve_router(
    stats,
    lam=1e-2,
    normalize=True,
    fit_intercept=True,
    lam_mode="absolute",
    balance=False,
    domains=None,
):
    """Closed-form router of every layer: -> (weight [L, E, H], bias [L, E]), both float64.

    Defaults are the reference formula: A = sum_e [[G_e, s_e], [s_e^T, n_e]], B[:, e] = [s_e; n_e],
    W = (A + lam I)^-1 B (lam also on the bias row), each expert column divided by the L2 norm of
    its weight part (bias divided by the same norm).
    lam_mode="trace" scales lam by tr(A) / dim(A), so one lam fits any token count.
    balance=True weights each domain's statistics by 1 / n_e (equal say for every domain).
    fit_intercept=False drops the bias (returned as zeros). domains: expert order (default:
    stats.domains).
    """
    if not isinstance(stats, RouterStats):
        raise TypeError(f"stats must be RouterStats, got {type(stats).__name__}")
    domains = list(stats.domains if domains is None else domains)
    if not domains:
        raise ValueError("stats hold no domains; nothing to solve")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains must be distinct, got {domains}")
    for domain in domains:
        stats._domain(domain)
    if lam_mode not in LAM_MODES:
        raise ValueError(f"lam_mode must be one of {LAM_MODES}, got {lam_mode!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    A, B = _solve_inputs(stats, domains, fit_intercept, balance)
    lam_t = torch.full((A.shape[0],), float(lam), dtype=_STORE, device=A.device)
    if lam_mode == "trace":
        lam_t = lam_t * A.diagonal(dim1=-2, dim2=-1).sum(-1) / A.shape[-1]
    W = ridge_solve(A, B, lam_t).to(_STORE)
    H = stats.hidden_size
    weight = W[:, :H, :].transpose(1, 2).contiguous()
    bias = W[:, H, :].contiguous() if fit_intercept else torch.zeros_like(W[:, 0, :])
    if normalize:
        norm = weight.norm(dim=-1)
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))
        weight, bias = weight / norm[..., None], bias / norm
    return weight, bias


def fit_router(model, stats, **solve_kwargs):
    """Solve the routers from `stats` and write them into `model` (expert order =
    model.config.domains). Returns the model."""
    check_model(stats, model)
    domains = list(model.config.domains)
    missing = [d for d in domains if d not in stats.domains]
    if missing:
        raise ValueError(
            f"stats lack the model's domains {missing} (stats hold {stats.domains}); "
            "collect them with collect_stats"
        )
    weight, bias = solve_router(stats, domains=domains, **solve_kwargs)
    with torch.no_grad():
        for layer, w, b in zip(model.dume_layers(), weight, bias, strict=True):
            layer.router.weight.copy_(w.to(layer.router.weight))
            if layer.router.bias is not None:
                layer.router.bias.copy_(b.to(layer.router.bias))
            elif solve_kwargs.get("fit_intercept", True):
                raise ValueError("the model's routers have no bias; pass fit_intercept=False")
    return model
