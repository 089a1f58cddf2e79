"""RouterStats: accumulation against float64 references, combining, files, bad input, precision."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastdume.router import FORMAT, RouterStats


def heavy_tailed(n, hidden, generator, outliers=2):
    """MoE-input-like hidden states: per-channel means and scales, Student-t tails (df 4) and a
    few 'massive activation' channels ~40x larger than the rest, as in trained LLMs."""
    g = generator
    scale = torch.exp(0.5 * torch.randn(hidden, generator=g))
    scale[torch.randperm(hidden, generator=g)[:outliers]] *= 40.0
    mean = 0.3 * torch.randn(hidden, generator=g)
    df = 4.0
    normal = torch.randn(n, hidden, generator=g)
    chi2 = torch.distributions.Gamma(df / 2, 0.5).sample((n, 1))
    return (mean + scale * normal / torch.sqrt(chi2 / df)).float()


def ref_stats(x, mask=None):
    x = x.reshape(-1, x.shape[-1]).double().numpy()
    if mask is not None:
        x = x[mask.reshape(-1).bool().numpy()]
    return x.T @ x, x.sum(0), x.shape[0]


def assert_close(actual, expected, rtol=1e-6):
    actual = np.asarray(actual)
    scale = max(np.abs(expected).max(), 1e-30)
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


def test_update_matches_float64_reference_with_mask_and_shapes():
    g = torch.Generator().manual_seed(1)
    stats = RouterStats(3, 24, ["a", "b"])
    x1 = torch.randn(4, 7, 24, generator=g)
    m1 = torch.rand(4, 7, generator=g) > 0.3
    x2 = torch.randn(11, 24, generator=g)
    assert stats.update(1, x1, "a", mask=m1) == int(m1.sum())
    assert stats.update(1, x2, "a") == 11
    G1, s1, n1 = ref_stats(x1, m1)
    G2, s2, n2 = ref_stats(x2)
    assert_close(stats.gram("a")[1].numpy(), G1 + G2)
    assert_close(stats.colsum("a")[1].numpy(), s1 + s2)
    assert stats.count("a").tolist() == [0, n1 + n2, 0]
    # symmetry exploited: only the lower triangle is stored
    upper = torch.triu(stats._gram["a"][1], diagonal=1)
    assert bool((upper == 0).all()) and bool((torch.tril(stats._gram["a"][1]) != 0).any())
    assert stats.tokens("b") == 0 and float(stats.gram("b").abs().sum()) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_hidden_states_raise_and_leave_stats_untouched(bad):
    stats = RouterStats(2, 8, ["a"])
    stats.update(0, torch.randn(5, 8), "a")
    before = stats.copy()
    x = torch.randn(6, 8)
    x[3, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        stats.update(0, x, "a")
    assert torch.equal(stats._gram["a"], before._gram["a"])
    assert stats.count("a").tolist() == before.count("a").tolist()


def test_bad_arguments_name_what_is_wrong():
    stats = RouterStats(2, 8, ["a"])
    with pytest.raises(ValueError, match="domain must be one of"):
        stats.update(0, torch.randn(3, 8), "nope")
    with pytest.raises(ValueError, match="layer must be in 0..1"):
        stats.update(2, torch.randn(3, 8), "a")
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        stats.update(0, torch.randn(3, 9), "a")
    with pytest.raises(ValueError, match="mask must have shape"):
        stats.update(0, torch.randn(3, 8), "a", mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="distinct"):
        RouterStats(2, 8, ["a", "a"])
    with pytest.raises(ValueError, match="hidden_size"):
        RouterStats(2, 0, ["a"])


def test_two_halves_equal_one_pass_and_add_merges_domains():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(50, 16, generator=g) for _ in range(4)]
    whole, first, second = (RouterStats(2, 16, ["a"]) for _ in range(3))
    for i, x in enumerate(xs):
        for layer in range(2):
            whole.update(layer, x * (layer + 1), "a")
            (first if i < 2 else second).update(layer, x * (layer + 1), "a")
    other = RouterStats(2, 16, ["b"])
    other.update(0, xs[0], "b")
    total = first + second + other
    assert total.domains == ["a", "b"]
    assert_close(total.gram("a").numpy(), whole.gram("a").numpy(), rtol=1e-12)
    assert_close(total.colsum("a").numpy(), whole.colsum("a").numpy(), rtol=1e-12)
    assert total.count("a").tolist() == whole.count("a").tolist() == [200, 200]
    assert first.tokens("a") == 100  # operands untouched
    with pytest.raises(ValueError, match="num_layers, hidden_size"):
        _ = whole + RouterStats(2, 8, ["a"])
    with pytest.raises(ValueError, match="other shared weights"):
        _ = RouterStats(2, 16, ["a"], fingerprint="f" * 64) + RouterStats(
            2, 16, ["a"], fingerprint="0" * 64
        )


def test_save_load_round_trip_with_metadata(tmp_path):
    g = torch.Generator().manual_seed(3)
    stats = RouterStats(2, 12, ["math", "code"], fingerprint="ab" * 32)
    for layer in range(2):
        stats.update(layer, torch.randn(30, 12, generator=g), "math")
        stats.update(layer, torch.randn(5, 3, 12, generator=g), "code")
    path = stats.save(tmp_path / "s.safetensors")
    loaded = RouterStats.load(path)
    assert loaded.domains == ["math", "code"] and loaded.fingerprint == "ab" * 32
    for d in stats.domains:
        assert torch.equal(loaded.gram(d), stats.gram(d))
        assert torch.equal(loaded.colsum(d), stats.colsum(d))
        assert torch.equal(loaded.count(d), stats.count(d))
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT and json.loads(meta["token_counts"]) == {"math": 30, "code": 15}
    assert (meta["num_layers"], meta["hidden_size"]) == ("2", "12")
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_broken_files_raise_and_failed_save_keeps_old_file(tmp_path, monkeypatch):
    stats = RouterStats(1, 4, ["a"])
    stats.update(0, torch.randn(9, 4), "a")
    path = tmp_path / "s.safetensors"
    stats.save(path)
    data = path.read_bytes()
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(data[: len(data) - 40])
    with pytest.raises(ValueError, match="truncated or not safetensors"):
        RouterStats.load(truncated)
    foreign = tmp_path / "f.safetensors"
    save_file({"w": torch.randn(3)}, foreign, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a fastdume router statistics file"):
        RouterStats.load(foreign)
    newer = tmp_path / "n.safetensors"
    import fastdume.router.stats as router

    monkeypatch.setattr(router, "FORMAT_VERSION", 99)
    stats.save(newer)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="format version '99'"):
        RouterStats.load(newer)

    def explode(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        RouterStats(1, 4, ["b"]).save(path)
    assert path.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["s.safetensors", "t.safetensors", "f.safetensors", "n.safetensors"]
    )


def _errors(tokens, hidden, chunk, seed=0):
    """Max error of the fp64-store (ours) and fp32-store Gram vs exact, relative to
    sqrt(G_ii G_jj), on heavy-tailed hidden states."""
    g = torch.Generator().manual_seed(seed)
    ours = RouterStats(1, hidden, ["a"])
    g32 = torch.zeros(hidden, hidden)
    s32 = torch.zeros(hidden)
    exact = torch.zeros(hidden, hidden, dtype=torch.float64)
    from fastdume.ops.gram import gram_accumulate, symmetrize

    done = 0
    while done < tokens:
        x = heavy_tailed(min(chunk, tokens - done), hidden, g)
        done += x.shape[0]
        ours.update(0, x, "a")
        gram_accumulate(x, g32, s32, precision="fp32")
        xd = x.double()
        exact += xd.T @ xd
    diag = exact.diagonal().sqrt()
    norm = diag[:, None] * diag[None, :]
    err_ours = float(((ours.gram("a")[0] - exact).abs() / norm).max())
    err_fp32 = float(((symmetrize(g32).double() - exact).abs() / norm).max())
    return err_ours, err_fp32


def test_fp64_store_keeps_error_at_one_batch_level():
    err_ours, err_fp32 = _errors(tokens=200_000, hidden=32, chunk=4096)
    print(f"200k tokens: fp32 products + fp64 store {err_ours:.2e}, fp32 store {err_fp32:.2e}")
    assert err_ours < 2e-6
    assert err_ours < err_fp32


@pytest.mark.slow
def test_accumulation_error_on_10m_tokens():
    err_ours, err_fp32 = _errors(tokens=10_000_000, hidden=64, chunk=8192)
    print(f"10M tokens: fp32 products + fp64 store {err_ours:.2e}, fp32 store {err_fp32:.2e}")
    assert err_ours < 2e-6
    assert err_fp32 > 5 * err_ours


# --- collect_stats / fit_router on a real (tiny) DUME model -----------------------------------


def _model(seed=0, **overrides):
    from tiny_models import tiny_dume

    return tiny_dume("llama", domains=("a", "b", "c"), seed=seed, **overrides)


def _batches(seed=0, count=3, batch=3, seq=10):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 256, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, 6:] = 0  # right padding
        mask[2, :3] = 0  # left padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _reference_inputs(model, domain, batches, skip_first=False):
    """MoE inputs per layer, taken independently as the output of post_attention_layernorm
    under oracle routing, with the padding (and first tokens) removed."""
    from fastdume.moe import forced_expert

    captured = []
    norms = [layer.post_attention_layernorm for layer in model.model.layers]
    per_layer = [[] for _ in norms]
    hooks = [
        n.register_forward_hook(lambda m, a, out, i=i: captured.append((i, out)))
        for i, n in enumerate(norms)
    ]
    with torch.no_grad(), forced_expert(model, domain):
        for b in batches:
            captured.clear()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            keep = b["attention_mask"].bool()
            if skip_first:
                first = keep.long().argmax(dim=1)
                keep[torch.arange(keep.shape[0]), first] = False
            for i, out in captured:
                per_layer[i].append(out[keep].double())
    for h in hooks:
        h.remove()
    return [torch.cat(xs) for xs in per_layer]


def _assert_stats_equal_reference(stats, domain, inputs):
    for layer, x in enumerate(inputs):
        x = x.numpy()
        assert_close(stats.gram(domain)[layer].numpy(), x.T @ x, rtol=1e-5)
        assert_close(stats.colsum(domain)[layer].numpy(), x.sum(0), rtol=1e-5)
        assert int(stats.count(domain)[layer]) == x.shape[0]


@pytest.mark.parametrize("skip_first", [False, True])
def test_collect_stats_matches_norm_outputs_and_excludes_padding(skip_first):
    from fastdume.router import collect_stats

    model, batches = _model(), _batches()
    stats = collect_stats(model, "b", batches, skip_first_token=skip_first, progress=False)
    assert stats.domains == ["b"] and stats.num_layers == 2 and stats.hidden_size == 64
    _assert_stats_equal_reference(stats, "b", _reference_inputs(model, "b", batches, skip_first))
    assert all(m.force_expert is None for m in model.dume_layers())
    assert not any(m._forward_pre_hooks for m in model.dume_layers())


def test_collect_stats_max_tokens_bare_tensors_and_extension():
    from fastdume.router import collect_stats

    model, batches = _model(), _batches()
    whole = collect_stats(model, "a", batches, progress=False)
    part = collect_stats(model, "a", batches[:1], progress=False)
    extended = collect_stats(model, "c", batches, stats=part, progress=False)
    extended = collect_stats(model, "a", batches[1:], stats=extended, progress=False)
    assert extended is part and extended.domains == ["a", "c"]
    assert_close(extended.gram("a").numpy(), whole.gram("a").numpy(), rtol=1e-6)
    assert extended.tokens("a") == whole.tokens("a")
    # 23 valid tokens per batch: the bound stops inside the second batch, in row-major order
    bounded = collect_stats(model, "a", batches, max_tokens=30, progress=False)
    assert bounded.count("a").tolist() == [30, 30]
    full = _reference_inputs(model, "a", batches[:2])
    for layer in range(2):
        x = full[layer][:30].numpy()
        assert_close(bounded.gram("a")[layer].numpy(), x.T @ x, rtol=1e-5)
    bare = collect_stats(model, "a", [b["input_ids"] for b in batches], progress=False)
    assert bare.tokens("a") == sum(b["input_ids"].numel() for b in batches)


def test_collect_stats_bad_input():
    from fastdume.router import collect_stats

    model = _model()
    with pytest.raises(ValueError, match="domain must be one of the model's domains"):
        collect_stats(model, "zzz", _batches(), progress=False)
    with pytest.raises(ValueError, match="no tokens collected"):
        collect_stats(model, "a", [], progress=False)
    masked = [{**b, "attention_mask": torch.zeros_like(b["attention_mask"])} for b in _batches()]
    with pytest.raises(ValueError, match="no tokens collected"):
        collect_stats(model, "a", masked, progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        collect_stats(model, "a", _batches(), max_tokens=0, progress=False)
    other = _model(seed=1)
    stats = collect_stats(other, "a", _batches(), progress=False)
    with pytest.raises(ValueError, match="other shared weights"):
        collect_stats(model, "a", _batches(), stats=stats, progress=False)


def test_fit_router_writes_solution_in_model_domain_order_and_checks_model(tmp_path):
    from fastdume.router import collect_stats, fit_router, solve_router

    model = _model()
    stats = None
    for d in ["c", "a", "b"]:  # stats order differs from the model's expert order
        stats = collect_stats(model, d, _batches(seed=ord(d)), stats=stats, progress=False)
    fit_router(model, stats)
    weight, bias = solve_router(stats.select(["a", "b", "c"]))
    for layer, moe in enumerate(model.dume_layers()):
        assert moe.router.weight.dtype == torch.float32
        assert torch.allclose(moe.router.weight.double(), weight[layer], atol=1e-6)
        assert torch.allclose(moe.router.bias.double(), bias[layer], atol=1e-6)
    path = stats.save(tmp_path / "s.safetensors")
    assert RouterStats.load(path, model=model).domains == ["c", "a", "b"]
    with pytest.raises(ValueError, match="other shared weights"):
        RouterStats.load(path, model=_model(seed=1))
    with pytest.raises(ValueError, match="num_layers, hidden_size"):
        fit_router(_model(num_hidden_layers=3), stats)
    with pytest.raises(ValueError, match=r"stats lack the model's domains \['b'\]"):
        fit_router(model, stats.select(["a", "c"]))


@pytest.mark.gpu
def test_collect_and_fit_on_cuda_match_cpu(tmp_path):
    from fastdume.router import collect_stats, fit_router, solve_router

    cpu_model, batches = _model(), _batches()
    cpu = collect_stats(cpu_model, "a", batches, progress=False)
    gpu_model = _model().to("cuda")
    gpu = collect_stats(gpu_model, "a", batches, progress=False)
    assert gpu.device.type == "cuda" and gpu.fingerprint == cpu.fingerprint
    assert gpu.count("a").tolist() == cpu.count("a").tolist()
    assert_close(gpu.gram("a").cpu().numpy(), cpu.gram("a").numpy(), rtol=1e-5)
    assert_close(gpu.colsum("a").cpu().numpy(), cpu.colsum("a").numpy(), rtol=1e-5)
    for d in ("b", "c"):
        gpu = collect_stats(gpu_model, d, _batches(seed=ord(d)), stats=gpu, progress=False)
    fit_router(gpu_model, gpu)
    loaded = RouterStats.load(gpu.save(tmp_path / "g.safetensors"), model=cpu_model)
    weight, _ = solve_router(loaded, domains=["a", "b", "c"])
    for layer, moe in enumerate(gpu_model.dume_layers()):
        assert torch.allclose(moe.router.weight.double().cpu(), weight[layer], atol=1e-4)
