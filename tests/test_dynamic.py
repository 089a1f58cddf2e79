"""add_expert / remove_expert against from-scratch builds on the same set of experts."""

import pytest
import torch
from dume_fixtures import domain_batches, make_experts

import fastdume
from fastdume.router import collect_stats, fit_router


def build(dirs, domains, shared, progress=False):
    model = fastdume.upcycle([dirs[d] for d in domains], domains=list(domains), shared=shared)
    stats = None
    for d in domains:
        stats = collect_stats(model, d, domain_batches(d), stats=stats, progress=progress)
    fit_router(model, stats)
    return model, stats


def assert_same_model(a, b, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape, key
        assert torch.allclose(sa[key].float(), sb[key].float(), rtol=1e-5, atol=atol), key
    assert a.config.domains == b.config.domains
    assert a.config.num_experts == b.config.num_experts
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    assert torch.allclose(la, lb, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def base_experts(tmp_path_factory):
    return make_experts(tmp_path_factory.mktemp("base_shared"), shared_noise=0.0)


def test_add_expert_with_base_shared_equals_build_from_scratch(base_experts):
    base_dir, dirs = base_experts
    shared = f"base:{base_dir}"
    full, full_stats = build(dirs, ["a", "b", "c"], shared)
    model, stats = build(dirs, ["a", "b"], shared)
    model, stats = fastdume.add_expert(
        model, dirs["c"], "c", domain_batches("c"), stats, progress=False
    )
    assert stats.domains == ["a", "b", "c"]
    for d in stats.domains:  # old domains reused, new one collected: all exact
        assert torch.allclose(stats.gram(d), full_stats.gram(d), rtol=1e-9, atol=1e-9)
    assert_same_model(model, full)
    # and back: removing gives the two-expert build
    two, _ = build(dirs, ["a", "b"], shared)
    model, stats = fastdume.remove_expert(model, "c", stats)
    assert stats.domains == ["a", "b"]
    assert_same_model(model, two)


def test_remove_middle_expert_matches_build(base_experts):
    base_dir, dirs = base_experts
    shared = f"base:{base_dir}"
    full, stats = build(dirs, ["a", "b", "c"], shared)
    ac, _ = build(dirs, ["a", "c"], shared)
    model, stats = fastdume.remove_expert(full, "b", stats)
    assert_same_model(model, ac)


def test_mean_shared_recollect_matches_build_and_stale_path_warns(tmp_path):
    base_dir, dirs = make_experts(tmp_path, shared_noise=0.01)
    full, _ = build(dirs, ["a", "b", "c"], "mean")
    model, stats = build(dirs, ["a", "b"], "mean")
    batches = {d: domain_batches(d) for d in ["a", "b", "c"]}
    model, stats = fastdume.add_expert(
        model, dirs["c"], "c", batches, stats, recollect=True, progress=False
    )
    assert_same_model(model, full, atol=1e-5)
    stale, stale_stats = build(dirs, ["a", "b"], "mean")
    with pytest.warns(UserWarning, match="approximate"):
        stale, stale_stats = fastdume.add_expert(
            stale, dirs["c"], "c", domain_batches("c"), stale_stats, progress=False
        )
    # shared weights are the running mean (exact to rounding); routers differ only through the
    # stale statistics of a and b
    for key, value in full.state_dict().items():
        if ".mlp.router" not in key:
            assert torch.allclose(stale.state_dict()[key], value, atol=1e-5), key
    # removing with the expert given takes it out of the mean again
    two, _ = build(dirs, ["a", "b"], "mean")
    model, stats = fastdume.remove_expert(
        model, "c", stats, expert=dirs["c"], recollect=True, batches=batches, progress=False
    )
    assert_same_model(model, two, atol=1e-5)


def test_bad_input_raises_and_leaves_model_untouched(base_experts, tmp_path):
    base_dir, dirs = base_experts
    model, stats = build(dirs, ["a", "b"], f"base:{base_dir}")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already an expert"):
        fastdume.add_expert(model, dirs["a"], "a", domain_batches("a"), stats)
    with pytest.raises(ValueError, match="must be one of the model's domains"):
        fastdume.remove_expert(model, "zzz", stats)
    with pytest.raises(ValueError, match="shared must match"):
        fastdume.add_expert(model, dirs["c"], "c", domain_batches("c"), stats, shared="mean")
    with pytest.raises(ValueError, match="recollect=True needs batches as a dict"):
        fastdume.add_expert(model, dirs["c"], "c", domain_batches("c"), stats, recollect=True)
    with pytest.raises(ValueError, match="stats lack the domains"):
        fastdume.add_expert(model, dirs["c"], "c", domain_batches("c"), stats.select(["a"]))
    from tiny_models import tiny_dense

    wide = tiny_dense("llama", seed=1, intermediate_size=96)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="intermediate_size"):
        fastdume.add_expert(model, tmp_path / "wide", "w", domain_batches("c"), stats)
    with pytest.raises(ValueError, match="no tokens collected"):
        fastdume.add_expert(model, dirs["c"], "c", [], stats, progress=False)
    after = model.state_dict()
    # the empty-data failure happens after the expert was appended: it must not be half-done
    assert sorted(after) == sorted(before) and model.config.domains == ["a", "b"]
    for key, value in before.items():
        assert torch.equal(after[key], value), key
