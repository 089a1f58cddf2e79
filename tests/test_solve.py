"""solve_router against the reference formula re-implemented here in float64 numpy."""

import numpy as np
import pytest
import torch

from fastdume.router import RouterStats, solve_router

L, H = 3, 20
DOMAINS = ["a", "b", "c"]


def make_data(seed=0, sizes=(300, 170, 240), spread=0.7):
    """Hidden states per domain and layer, each domain with its own mean (so routing is easy)."""
    g = torch.Generator().manual_seed(seed)
    data = {}
    for d, n in zip(DOMAINS, sizes, strict=True):
        centre = spread * torch.randn(L, 1, H, generator=g)
        scale = torch.exp(0.4 * torch.randn(L, 1, H, generator=g))
        data[d] = centre + scale * torch.randn(L, n, H, generator=g)
    return data


def stats_of(data, chunk=64):
    stats = RouterStats(L, H, list(data))
    for d, x in data.items():
        for layer in range(L):
            for start in range(0, x.shape[1], chunk):
                stats.update(layer, x[layer, start : start + chunk], d)
    return stats


def reference(data, layer, lam=1e-2, normalize=True, intercept=True, trace=False, balance=False):
    """The DUME reference: Z = [X, 1], one-hot Y, W = (Z^T Z + lam I)^-1 Z^T Y, columns
    divided by the norm of their weight part; built the slow explicit way."""
    xs = [data[d][layer].double().numpy() for d in DOMAINS]
    X = np.concatenate(xs)
    Z = np.concatenate([X, np.ones((len(X), 1))], axis=1) if intercept else X
    Y = np.zeros((len(X), len(DOMAINS)))
    w = np.zeros(len(X))
    start = 0
    for e, x in enumerate(xs):
        Y[start : start + len(x), e] = 1.0
        w[start : start + len(x)] = 1.0 / len(x) if balance else 1.0
        start += len(x)
    A = Z.T @ (Z * w[:, None])
    B = Z.T @ (Y * w[:, None])
    lam_eff = lam * np.trace(A) / A.shape[0] if trace else lam
    W = np.linalg.solve(A + lam_eff * np.eye(A.shape[0]), B)
    weight, bias = W[:H].T, (W[H] if intercept else np.zeros(len(DOMAINS)))
    if normalize:
        norm = np.linalg.norm(weight, axis=1)
        weight, bias = weight / norm[:, None], bias / norm
    return weight, bias


def assert_rel(actual, expected, rtol=1e-6):
    actual = actual.numpy()
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rtol, err


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"lam": 0.5},
        {"normalize": False},
        {"fit_intercept": False},
        {"lam_mode": "trace", "lam": 1e-3},
        {"balance": True},
        {"balance": True, "fit_intercept": False, "normalize": False},
    ],
)
def test_matches_reference_formula_in_float64(kwargs):
    data = make_data()
    weight, bias = solve_router(stats_of(data), **kwargs)
    assert weight.shape == (L, len(DOMAINS), H) and bias.shape == (L, len(DOMAINS))
    assert weight.dtype == torch.float64
    ref_kwargs = {
        "lam": kwargs.get("lam", 1e-2),
        "normalize": kwargs.get("normalize", True),
        "intercept": kwargs.get("fit_intercept", True),
        "trace": kwargs.get("lam_mode") == "trace",
        "balance": kwargs.get("balance", False),
    }
    for layer in range(L):
        ref_w, ref_b = reference(data, layer, **ref_kwargs)
        assert_rel(weight[layer], ref_w)
        if ref_kwargs["intercept"]:
            assert_rel(bias[layer], ref_b)
        else:
            assert bool((bias[layer] == 0).all())


def test_default_fit_routes_held_out_tokens_to_their_domain():
    data = make_data(seed=1, sizes=(350, 220, 290))
    train = {d: x[:, :-50] for d, x in data.items()}
    test = {d: x[:, -50:] for d, x in data.items()}
    weight, bias = solve_router(stats_of(train))
    for layer in range(L):
        for e, d in enumerate(DOMAINS):
            logits = test[d][layer].double() @ weight[layer].T + bias[layer]
            assert float((logits.argmax(-1) == e).double().mean()) > 0.75  # chance: 1/3


def test_domain_order_permutes_experts_and_trace_mode_is_scale_free():
    data = make_data(seed=2)
    stats = stats_of(data)
    w, b = solve_router(stats)
    w2, b2 = solve_router(stats, domains=["c", "a", "b"])
    assert torch.allclose(w2, w[:, [2, 0, 1]], rtol=1e-10, atol=1e-12)
    assert torch.allclose(b2, b[:, [2, 0, 1]], rtol=1e-10, atol=1e-12)
    # Twice the same data: trace-scaled lam gives the same router, absolute lam does not.
    doubled = stats + stats
    wt, _ = solve_router(stats, lam_mode="trace", lam=0.1)
    wt2, _ = solve_router(doubled, lam_mode="trace", lam=0.1)
    assert torch.allclose(wt, wt2, rtol=1e-9, atol=1e-12)
    wa, _ = solve_router(stats, lam=100.0)
    wa2, _ = solve_router(doubled, lam=100.0)
    assert not torch.allclose(wa, wa2, rtol=1e-6, atol=0)


def test_bad_input_raises_clearly():
    stats = stats_of(make_data())
    empty = stats + RouterStats(L, H, ["d"])
    with pytest.raises(ValueError, match="'d' have zero tokens"):
        solve_router(empty)
    with pytest.raises(ValueError, match="domain must be one of"):
        solve_router(stats, domains=["a", "zzz"])
    with pytest.raises(ValueError, match="distinct"):
        solve_router(stats, domains=["a", "a"])
    with pytest.raises(ValueError, match="lam must be"):
        solve_router(stats, lam=-1.0)
    with pytest.raises(ValueError, match="lam_mode must be one of"):
        solve_router(stats, lam_mode="relative")
    with pytest.raises(TypeError, match="RouterStats"):
        solve_router({"a": 1})
