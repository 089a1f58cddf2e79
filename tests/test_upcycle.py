"""upcycle: merged weights against an independent float64 merge and transformers' dense models,
streaming memory, compatibility checks before any work, the `fastdume upcycle` command."""

import json
import sys
import weakref

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, tiny_dense

import fastdume
import fastdume.merge.sources as sources_module
from fastdume.moe import DumeForCausalLM, forced_expert

MLP = ("gate_proj", "up_proj", "down_proj")


def _save(models, root, names):
    paths = []
    for model, name in zip(models, names, strict=True):
        model.save_pretrained(root / name)
        paths.append(root / name)
    return paths


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_experts")
    models = [tiny_dense("llama", seed=s) for s in range(3)]
    return models, _save(models, root, ["math", "code", "law"])


def _dense_with(models, expert, layers):
    """transformers' own dense model: mean shared weights, `expert`'s MLPs (float64 merge)."""
    states = [m.state_dict() for m in models]
    merged = {}
    for key in states[0]:
        if ".mlp." in key:
            merged[key] = states[expert][key]
        else:
            merged[key] = torch.stack([s[key].double() for s in states]).mean(0).float()
    dense = type(models[0])(models[0].config).eval()
    dense.load_state_dict(merged)
    return dense


@pytest.mark.parametrize("family", FAMILIES)
def test_upcycle_mean_merge_matches_dense_models(family, tmp_path):
    tied = family == "qwen2"
    models = [tiny_dense(family, seed=s, tie_word_embeddings=tied) for s in range(3)]
    paths = _save(models, tmp_path, ["d0", "d1", "d2"])
    model = fastdume.upcycle([str(p) for p in paths])
    assert isinstance(model, DumeForCausalLM)
    assert model.config.domains == ["d0", "d1", "d2"] and model.config.shared == "mean"
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        for e in range(3):
            expected = _dense_with(models, e, model.config.num_hidden_layers)(ids).logits
            with forced_expert(model, e):
                got = model(ids).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for moe in model.dume_layers():  # unfitted routers: exactly zero
        assert not moe.router.weight.any() and not moe.router.bias.any()


def test_expert_slices_and_objects_equal_directories(llama_dirs):
    models, paths = llama_dirs
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    from_dirs = fastdume.upcycle(paths)
    from_objects = fastdume.upcycle(dict(zip(["math", "code", "law"], models, strict=True)))
    for model, state in zip(models, before, strict=True):  # the caller's models are untouched
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert from_objects.config.domains == ["math", "code", "law"]
    a, b = from_dirs.state_dict(), from_objects.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inter = models[0].config.intermediate_size
    for layer, moe in enumerate(from_dirs.dume_layers()):
        for e, dense in enumerate(models):
            mlp = dense.model.layers[layer].mlp
            assert torch.equal(moe.experts.gate_up_proj[e, :inter], mlp.gate_proj.weight)
            assert torch.equal(moe.experts.gate_up_proj[e, inter:], mlp.up_proj.weight)
            assert torch.equal(moe.experts.down_proj[e], mlp.down_proj.weight)


def test_every_value_is_written(llama_dirs, monkeypatch):
    """The result's storage starts uninitialised: poison it, nothing may survive the merge."""
    module = sys.modules["fastdume.merge.upcycle"]
    empty = module._empty_model

    def poisoned(*args):
        model = empty(*args)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        return model

    monkeypatch.setattr(module, "_empty_model", poisoned)
    models, paths = llama_dirs
    model = fastdume.upcycle(paths)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_single_expert_is_the_dense_model(llama_dirs):
    models, paths = llama_dirs
    model = fastdume.upcycle(paths[1:2])
    ids = torch.randint(0, 256, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, models[1](ids).logits, rtol=0, atol=0)


def test_shared_from_base_and_sharded_checkpoints(llama_dirs, tmp_path):
    models, paths = llama_dirs
    base = tiny_dense("llama", seed=7)
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    model = fastdume.upcycle(paths, shared=f"base:{tmp_path / 'base'}")
    assert model.config.shared == f"base:{tmp_path / 'base'}"
    got, want = model.state_dict(), base.state_dict()
    for key, value in want.items():
        if ".mlp." not in key:
            assert torch.equal(got[key], value), key
    # a sharded expert merges like any other
    models[0].save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    again = fastdume.upcycle([tmp_path / "sharded", *paths[1:]], domains=["a", "b", "c"])
    reference = fastdume.upcycle(paths, domains=["a", "b", "c"])
    for key, value in reference.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_dtype_default_and_override(tmp_path):
    models = [tiny_dense("mistral", seed=s).to(torch.bfloat16) for s in range(2)]
    paths = _save(models, tmp_path, ["a", "b"])
    model = fastdume.upcycle(paths)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.dume_layers()[0].experts.gate_up_proj.dtype == torch.bfloat16
    assert model.dume_layers()[0].router.weight.dtype == torch.float32
    half = fastdume.upcycle(paths, dtype=torch.float16)
    assert half.dume_layers()[1].experts.down_proj.dtype == torch.float16
    expected = torch.stack([m.model.norm.weight.double() for m in models]).mean(0)
    torch.testing.assert_close(half.model.norm.weight.double(), expected, rtol=1e-3, atol=0)


class _TrackedSafeOpen:
    """safe_open whose tensors are counted while alive: the peak of bytes held from checkpoints."""

    live = peak = reads = 0

    def __init__(self, real):
        self._real = real

    def __enter__(self):
        self._handle = self._real.__enter__()
        return self

    def __exit__(self, *exc):
        return self._real.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_slice(self, key):
        return self._handle.get_slice(key)

    def get_tensor(self, key):
        tensor = self._handle.get_tensor(key)
        size = tensor.numel() * tensor.element_size()
        cls = type(self)
        cls.reads += 1
        cls.live += size
        cls.peak = max(cls.peak, cls.live)
        weakref.finalize(tensor, lambda: setattr(cls, "live", cls.live - size))
        return tensor


@pytest.fixture
def tracked(monkeypatch):
    real = sources_module.safe_open
    monkeypatch.setattr(_TrackedSafeOpen, "live", 0)
    monkeypatch.setattr(_TrackedSafeOpen, "peak", 0)
    monkeypatch.setattr(_TrackedSafeOpen, "reads", 0)
    monkeypatch.setattr(
        sources_module, "safe_open", lambda *a, **k: _TrackedSafeOpen(real(*a, **k))
    )
    return _TrackedSafeOpen


def test_streaming_holds_at_most_one_experts_tensors(tracked, tmp_path):
    """Loading all 4 experts at once would hold ~4x one expert's bytes; loading one whole expert
    at a time is the bound the contract allows; the implementation needs one tensor per key."""
    models = [tiny_dense("llama", seed=s, num_hidden_layers=3) for s in range(4)]
    paths = _save(models, tmp_path, ["a", "b", "c", "d"])
    one_expert = sum(t.numel() * t.element_size() for t in models[0].state_dict().values())
    model = fastdume.upcycle(paths)
    assert tracked.reads >= 4 * len(models[0].state_dict())  # every tensor really was read
    assert 0 < tracked.peak <= one_expert
    largest = max(t.numel() * t.element_size() for t in models[0].state_dict().values())
    assert tracked.peak <= largest  # tensor by tensor
    assert tracked.live == 0
    assert model.config.num_experts == 4


def _rewrite(path, change):
    """Rewrite a saved expert's safetensors file with `change(state)` applied."""
    file = path / "model.safetensors"
    state = load_file(file)
    change(state)
    save_file(state, file, metadata={"format": "pt"})


def _bad_cases(tmp_path):
    good = tiny_dense("llama", seed=0)
    cases = {}
    root = tmp_path / "bad"

    def saved(name, model):
        model.save_pretrained(root / name)
        return root / name

    base = saved("good", good)
    cases["family"] = (
        [base, saved("mistral", tiny_dense("mistral"))],
        "one family.*'llama'.*'mistral'",
    )
    cases["config"] = (
        [base, saved("wider", tiny_dense("llama", intermediate_size=96))],
        "config field 'intermediate_size' differs.*128.*96",
    )
    cases["rope"] = (
        [base, saved("rope", tiny_dense("llama", rope_theta=500.0))],
        "config field 'rope_parameters' differs",
    )
    missing = saved("missing", tiny_dense("llama", seed=1))
    _rewrite(missing, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    cases["missing"] = ([base, missing], "missing tensor 'model.layers.1.mlp.up_proj.weight'")
    shape = saved("shape", tiny_dense("llama", seed=2))
    _rewrite(shape, lambda s: s.update({"model.norm.weight": torch.ones(63)}))
    cases["shape"] = ([base, shape], r"'model.norm.weight' has shape \[63\].*expected \[64\]")
    truncated = saved("truncated", tiny_dense("llama", seed=3))
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = ([base, truncated], "not a readable safetensors file")
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((base / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    cases["pickle"] = ([base, pickled], "never loaded")
    dume = root / "dume"
    fastdume.upcycle([base]).save_pretrained(dume)
    cases["dume"] = ([base, dume], "'dume'")
    cases["not a model"] = ([base, 3], r"experts\[1\] must be a model directory")
    cases["no dir"] = ([base, root / "nowhere"], "not a directory")
    return base, cases


def test_bad_experts_raise_before_any_tensor_is_read(tracked, tmp_path):
    _, cases = _bad_cases(tmp_path)
    tracked.reads = 0
    for name, (experts, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            fastdume.upcycle(experts)
        assert tracked.reads == 0, name


def test_vocabulary_domains_and_shared_checks(llama_dirs, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    _, paths = llama_dirs
    for name, vocab in (("x", {"a": 0, "b": 1, "c": 2}), ("y", {"a": 0, "b": 2, "c": 1})):
        tiny_dense("llama").save_pretrained(tmp_path / name)
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a"))
        tok.save(str(tmp_path / name / "tokenizer.json"))
    with pytest.raises(ValueError, match="token 'b' has id 1 in .*x.* but 2 in .*y"):
        fastdume.upcycle([tmp_path / "x", tmp_path / "y"])
    with pytest.raises(ValueError, match="domain name 'code' is used twice"):
        fastdume.upcycle(paths, domains=["code", "code", "law"])
    with pytest.raises(ValueError, match="domain name 'math' is used twice"):
        fastdume.upcycle([paths[0], paths[0]])
    with pytest.raises(ValueError, match="domains must be None when experts is a dict"):
        fastdume.upcycle({"a": paths[0]}, domains=["a"])
    with pytest.raises(ValueError, match="list of 3 names"):
        fastdume.upcycle(paths, domains=["a", "b"])
    with pytest.raises(ValueError, match="shared must be 'mean' or 'base:<dir>'"):
        fastdume.upcycle(paths, shared="median")
    with pytest.raises(ValueError, match="non-empty list"):
        fastdume.upcycle([])
    with pytest.raises(ValueError, match="dtype"):
        fastdume.upcycle(paths, dtype=torch.int8)


def test_cli_upcycle_writes_a_loadable_model_and_json(llama_dirs, tmp_path, capsys):
    from fastdume.cli import main

    _, paths = llama_dirs
    out, summary = tmp_path / "dume", tmp_path / "summary.json"
    args = [*map(str, paths), "--out", str(out), "--domains", "m,c,l", "--top-k", "2"]
    assert main(["upcycle", *args, "--json", str(summary)]) == 0
    printed = capsys.readouterr().out
    assert "upcycled 3 llama experts" in printed and "m, c, l" in printed
    data = json.loads(summary.read_text())
    assert data["domains"] == ["m", "c", "l"] and data["top_k"] == 2 and data["num_layers"] == 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    reference = fastdume.upcycle(paths, domains=["m", "c", "l"], top_k=2)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # a second run into the now non-empty directory fails up front and changes nothing
    before = sorted(p.name for p in out.iterdir())
    assert main(["upcycle", *args]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_upcycle_the_test_zoo_and_its_tokenizer(test_zoo, tmp_path):
    """Real trained experts (fully fine-tuned from one base): oracle routing to expert d is the
    base model carrying d's MLPs, on real tokens of domain d."""
    from fastdume.cli import main
    from fastdume.data import batches, load_tokenizer

    out = tmp_path / "dume"
    experts = [str(test_zoo.experts[d]) for d in test_zoo.domains]
    assert main(["upcycle", *experts, "--out", str(out), "--shared", f"base:{test_zoo.base}"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.domains == list(test_zoo.domains)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == load_tokenizer().get_vocab()

    domain = test_zoo.domains[1]
    reference = transformers.AutoModelForCausalLM.from_pretrained(test_zoo.base).eval()
    expert = transformers.AutoModelForCausalLM.from_pretrained(test_zoo.experts[domain])
    reference.load_state_dict(
        {k: v for k, v in expert.state_dict().items() if ".mlp." in k}, strict=False
    )
    batch = next(iter(batches(tokenizer, domain, "validation", seq_len=32, batch_size=2)))
    with torch.no_grad(), forced_expert(model, domain):
        got = model(**batch).logits
        expected = reference(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_default_domains_tell_same_named_directories_apart(tmp_path):
    """runs/a/final and runs/b/final get a/final and b/final, not 'final' twice."""
    paths = _save([tiny_dense("llama", seed=s) for s in range(2)], tmp_path, ["a/final", "b/final"])
    assert fastdume.upcycle(paths).config.domains == ["a/final", "b/final"]
    unique = _save([tiny_dense("llama", seed=2)], tmp_path, ["c/math"])
    assert fastdume.upcycle([paths[0], *unique]).config.domains == ["final", "math"]


def test_a_shape_mismatch_is_reported_before_a_name_clash(tmp_path):
    small = tiny_dense("llama", seed=0)
    wide = tiny_dense("llama", seed=1, intermediate_size=96)
    paths = _save([small, wide], tmp_path, ["x/final", "y/final"])
    with pytest.raises(ValueError, match="intermediate_size"):
        fastdume.upcycle(paths, domains=["same", "same"])
