"""The closed-form router fit (DUME): ridge regression of the one-hot expert target on the MoE
inputs, assembled from RouterStats, solved in fp64, written into a model; the vocabulary router's
closed form is naive Bayes on the domains' token counts."""

import math

import torch

from fastdume.ops.gram import symmetrize
from fastdume.ops.ridge import ridge_solve
from fastdume.router.fingerprint import check_model
from fastdume.router.stats import STORE, RouterStats

LAM_MODES = ("absolute", "trace")


def _solve_inputs(stats, domains, fit_intercept, balance):
    """(A [L, n, n], B [L, n, E]) of the (optionally bias-augmented) ridge system, fp64."""
    L, H = stats.num_layers, stats.hidden_size
    n = H + 1 if fit_intercept else H
    device = stats.device
    lower = torch.zeros(L, H, H, dtype=STORE, device=device)
    A = torch.zeros(L, n, n, dtype=STORE, device=device)
    B = torch.zeros(L, n, len(domains), dtype=STORE, device=device)
    for e, domain in enumerate(domains):
        count = stats.count(domain).to(STORE)
        if bool((count == 0).any()):
            raise ValueError(f"statistics of domain {domain!r} have zero tokens; collect some")
        w = (1.0 / count if balance else torch.ones_like(count))[:, None]
        lower += stats.lower(domain) * w[..., None]
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
    Statistics of the vocabulary router (token counts) get `naive_bayes` instead, with lam as
    its smoothing count; normalize, fit_intercept and balance do not apply there.
    """
    if not isinstance(stats, RouterStats):
        raise TypeError(f"stats must be RouterStats, got {type(stats).__name__}")
    domains = list(stats.domains if domains is None else domains)
    if not domains:
        raise ValueError("stats hold no domains; nothing to solve")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains must be distinct, got {domains}")
    for domain in domains:
        stats.count(domain)  # raises for a domain the stats do not hold
    if lam_mode not in LAM_MODES:
        raise ValueError(f"lam_mode must be one of {LAM_MODES}, got {lam_mode!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if not stats.has_gram:
        return naive_bayes(stats, domains, lam, lam_mode)
    A, B = _solve_inputs(stats, domains, fit_intercept, balance)
    lam_t = torch.full((A.shape[0],), float(lam), dtype=STORE, device=A.device)
    if lam_mode == "trace":
        lam_t = lam_t * A.diagonal(dim1=-2, dim2=-1).sum(-1) / A.shape[-1]
    W = ridge_solve(A, B, lam_t).to(STORE)
    H = stats.hidden_size
    weight = W[:, :H, :].transpose(1, 2).contiguous()
    bias = W[:, H, :].contiguous() if fit_intercept else torch.zeros_like(W[:, 0, :])
    if normalize:
        norm = weight.norm(dim=-1)
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))
        weight, bias = weight / norm[..., None], bias / norm
    return weight, bias


def naive_bayes(stats, domains, lam=1e-2, lam_mode="absolute"):
    """The vocabulary router: weight[0, e, v] = log((c_e[v] + lam) / (n_e + lam V)), domain e's
    additively smoothed unigram log-probability of token v, bias 0 (every domain the same
    prior). Its logits at t, the mean of the weight columns of the tokens so far, are each
    domain's mean log-likelihood of the sequence so far, so the top-1 expert is the naive-Bayes
    choice; each expert's row depends on its own counts only, so add/remove stay exact.
    -> (weight [1, E, V], bias [1, E]), float64."""
    if lam_mode != "absolute":
        raise ValueError(
            f"lam_mode must be 'absolute' for token-count statistics, got {lam_mode!r}"
        )
    if not lam > 0:
        raise ValueError(
            f"lam must be > 0 for token-count statistics (it smooths unseen tokens), got {lam!r}"
        )
    for domain in domains:
        if int(stats.count(domain)[0]) == 0:
            raise ValueError(f"statistics of domain {domain!r} have zero tokens; collect some")
    counts = torch.stack([stats.colsum(d)[0] for d in domains]) + lam  # [E, V]
    weight = (counts / counts.sum(-1, keepdim=True)).log()[None]
    return weight, torch.zeros(1, len(domains), dtype=STORE, device=weight.device)


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
        for router, w, b in zip(model.dume_routers(), weight, bias, strict=True):
            router.weight.copy_(w.to(router.weight))
            if router.bias is not None:
                router.bias.copy_(b.to(router.bias))
            elif solve_kwargs.get("fit_intercept", True):
                raise ValueError("the model's routers have no bias; pass fit_intercept=False")
    return model
