"""`fastdume remove-expert` end to end against fastdume.remove_expert and a from-scratch build."""

import json

import pytest
import torch
import transformers
from dume_fixtures import domain_batches, make_experts

import fastdume
from fastdume.cli import main
from fastdume.router import RouterStats, collect_stats, fit_router

NAMES = {"a": "code", "b": "legal", "c": "math"}  # corpus domains, so --recollect --corpus works


def _build(root, dirs, shared, keys="abc"):
    """A fitted DUME model saved under root/dume-<keys>, and one statistics file per domain."""
    domains = [NAMES[k] for k in keys]
    model = fastdume.upcycle([dirs[k] for k in keys], domains=domains, shared=shared)
    stats = None
    for k in keys:
        stats = collect_stats(model, NAMES[k], domain_batches(k), stats=stats, progress=False)
    fit_router(model, stats)
    model_dir = root / f"dume-{keys}"
    model.save_pretrained(model_dir)
    paths = []
    for d in domains:
        paths.append(root / f"{d}-{keys}.safetensors")
        stats.select([d]).save(paths[-1])
    return model_dir, paths


@pytest.fixture(scope="module")
def base_dume(tmp_path_factory):
    root = tmp_path_factory.mktemp("remove_base")
    base, dirs = make_experts(root)
    model_dir, paths = _build(root, dirs, f"base:{base}")
    return model_dir, paths, dirs, base


@pytest.fixture(scope="module")
def mean_dume(tmp_path_factory):
    root = tmp_path_factory.mktemp("remove_mean")
    _, dirs = make_experts(root, shared_noise=0.01, vocab_size=4096)  # the shipped tokenizer's
    model_dir, paths = _build(root, dirs, "mean")
    return model_dir, paths, dirs


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _reference(model_dir, domain, paths, **kwargs):
    """fastdume.remove_expert in Python on the same files."""
    model = _load(model_dir)
    stats = None
    for path in paths:
        part = RouterStats.load(path, model=model)
        stats = part if stats is None else stats + part
    return fastdume.remove_expert(model, domain, stats, **kwargs)


def _remove(model_dir, domain, out, *extra):
    return main(
        ["remove-expert", str(model_dir), domain, "--out", str(out), "--no-progress", *extra]
    )


def assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert a.config.domains == b.config.domains
    assert a.config.num_experts == b.config.num_experts == len(a.config.domains)


def _stats_equal(a, b):
    assert a.domains == b.domains
    for d in a.domains:
        assert a.tokens(d) == b.tokens(d)
        assert torch.equal(a.gram(d), b.gram(d)) and torch.equal(a.colsum(d), b.colsum(d))


def test_remove_expert_base_shared_matches_api_and_build(base_dume, tmp_path, capsys):
    model_dir, paths, dirs, base = base_dume
    out = tmp_path / "out"
    assert (
        _remove(
            model_dir, "legal", out, "--stats", *map(str, paths), "--json", str(tmp_path / "s.json")
        )
        == 0
    )
    assert "removed expert 'legal'" in capsys.readouterr().out
    got = _load(out)
    ref, ref_stats = _reference(model_dir, "legal", paths)
    assert got.config.domains == ["code", "math"]
    assert_identical(got, ref)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, ref(input_ids=ids).logits)

    # the remaining experts and the shared weights are the original ones, untouched
    original = _load(model_dir)
    for mine, theirs in zip(got.dume_layers(), original.dume_layers(), strict=True):
        assert torch.equal(mine.experts.gate_up_proj, theirs.experts.gate_up_proj[[0, 2]])
        assert torch.equal(mine.experts.down_proj, theirs.experts.down_proj[[0, 2]])
    before = original.state_dict()
    for key, value in got.state_dict().items():
        if ".mlp." not in key:
            assert torch.equal(value, before[key]), key

    # independent reference: build the two-expert model from scratch and fit its routers
    scratch = fastdume.upcycle(
        [dirs["a"], dirs["c"]], domains=["code", "math"], shared=f"base:{base}"
    )
    stats = RouterStats.load(paths[0], model=scratch) + RouterStats.load(paths[2], model=scratch)
    fit_router(scratch, stats)
    for mine, theirs in zip(got.dume_layers(), scratch.dume_layers(), strict=True):
        assert torch.allclose(mine.router.weight, theirs.router.weight, atol=1e-6)
        assert torch.allclose(mine.router.bias, theirs.router.bias, atol=1e-6)

    saved = RouterStats.load(out / "router_stats.safetensors", model=got)
    _stats_equal(saved, ref_stats)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["removed"] == "legal" and summary["domains"] == ["code", "math"]
    assert summary["stats_out"] == str(out / "router_stats.safetensors")
    assert summary["warnings"] == []

    # without the removed domain's statistics, with a solve option and --stats-out elsewhere
    out2, stats_out = tmp_path / "out2", tmp_path / "kept" / "stats.safetensors"
    extra = ["--stats", str(paths[0]), str(paths[2]), "--lam", "0.1", "--stats-out", str(stats_out)]
    assert _remove(model_dir, "legal", out2, *extra) == 0
    got = _load(out2)
    ref, ref_stats = _reference(model_dir, "legal", [paths[0], paths[2]], lam=0.1)
    assert_identical(got, ref)
    _stats_equal(RouterStats.load(stats_out, model=got), ref_stats)
    assert not (out2 / "router_stats.safetensors").exists()


def test_remove_expert_mean_shared_matches_api(mean_dume, tmp_path):
    model_dir, paths, dirs = mean_dume
    args = ["--stats", *map(str, paths), "--json", str(tmp_path / "s.json")]

    # --expert takes it out of the shared mean; the other statistics become approximate
    assert _remove(model_dir, "math", tmp_path / "o1", *args, "--expert", str(dirs["c"])) == 0
    with pytest.warns(UserWarning, match="approximate"):
        ref, ref_stats = _reference(model_dir, "math", paths, expert=dirs["c"])
    got = _load(tmp_path / "o1")
    assert_identical(got, ref)
    assert got.config.domains == ["code", "legal"]
    _stats_equal(RouterStats.load(tmp_path / "o1" / "router_stats.safetensors"), ref_stats)
    assert any(
        "approximate" in w for w in json.loads((tmp_path / "s.json").read_text())["warnings"]
    )

    # without --expert the shared weights keep its share (warned), routers refit all the same
    assert _remove(model_dir, "math", tmp_path / "o2", *args) == 0
    with pytest.warns(UserWarning, match="keep its share"):
        ref, _ = _reference(model_dir, "math", paths)
    assert_identical(_load(tmp_path / "o2"), ref)
    assert any(
        "keep its share" in w for w in json.loads((tmp_path / "s.json").read_text())["warnings"]
    )

    # --recollect --corpus: every remaining domain's statistics re-run on the new model
    data = ["--seq-len", "32", "--batch-size", "4", "--max-tokens", "64"]
    extra = ["--expert", str(dirs["c"]), "--recollect", "--corpus", *data]
    assert _remove(model_dir, "math", tmp_path / "o3", *extra) == 0
    from fastdume.data import batches, load_tokenizer

    tok = load_tokenizer()
    fresh = {d: batches(tok, d, "train", 32, 4) for d in ("code", "legal")}
    ref, ref_stats = _reference(
        model_dir,
        "math",
        [],
        expert=dirs["c"],
        recollect=True,
        batches=fresh,
        max_tokens=64,
        progress=False,
    )
    got = _load(tmp_path / "o3")
    assert_identical(got, ref)
    saved = RouterStats.load(tmp_path / "o3" / "router_stats.safetensors", model=got)
    _stats_equal(saved, ref_stats)
    assert saved.tokens("code") == 64


def test_bad_input_exits_2_and_writes_nothing(base_dume, tmp_path, capsys, monkeypatch):
    model_dir, paths, dirs, base = base_dume
    stats = ["--stats", *map(str, paths)]
    out = tmp_path / "out"

    def refused(*args, match):
        assert _remove(*args) == 2
        err = capsys.readouterr().err
        assert "fastdume remove-expert: error: " in err and match in err, err
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)

    keep = []
    refused(model_dir, "zzz", out, *stats, match="domains ['code', 'legal', 'math'], got 'zzz'")
    refused(tmp_path / "nope", "legal", out, *stats, match="nope is not a model directory")
    refused(model_dir, "legal", out, "--stats", str(tmp_path / "gone.st"), match="gone.st")
    refused(
        model_dir, "legal", out, "--stats", str(paths[0]), match="stats lack the domains ['math']"
    )
    refused(model_dir, "legal", out, match="need --stats")
    refused(model_dir, "legal", out, *stats, "--recollect", match="--recollect needs --corpus")
    refused(model_dir, "legal", out, *stats, "--expert", str(tmp_path / "x"), match="--expert")

    one_dir, one_paths = _build(tmp_path, dirs, f"base:{base}", keys="a")
    keep = [p.name for p in tmp_path.iterdir()]
    refused(
        one_dir, "code", out, "--stats", str(one_paths[0]), match="'code': it is the model's only"
    )

    (tmp_path / "taken.st").write_bytes(b"mine")
    keep.append("taken.st")
    refused(
        model_dir, "legal", out, *stats, "--stats-out", str(tmp_path / "taken.st"), match="taken.st"
    )
    assert (tmp_path / "taken.st").read_bytes() == b"mine"

    # an existing non-empty --out is left exactly as it was
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert _remove(model_dir, "legal", full, *stats) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    keep.append("full")

    # a failure while writing leaves no model directory and no temporary files behind
    def broken(self, path):
        raise ValueError("disk full")

    monkeypatch.setattr(RouterStats, "save", broken)
    refused(model_dir, "legal", out, *stats, match="disk full")
