"""The model zoo: layout, cache, resume, determinism, specialisation; the tiny family configs."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import fastdume.data.zoo as zoo_mod
from fastdume.data import domains, load_tokenizer
from fastdume.data.zoo import FAMILIES, build_zoo, evaluate_zoo, tiny_config, tiny_model

# A zoo small enough to build several times in a test: structure, cache and determinism only.
MICRO = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    intermediate_size=48, seq_len=32, batch_size=4, base_steps=3, expert_steps=2,
)  # fmt: skip
# Test preset: each expert must beat the base's perplexity on its own domain by this fraction
# (as the demo preset must) and lose to it on some other domain. Measured: 25-62% better.
TEST_GAIN = 0.15


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_test_zoo_is_a_set_of_standard_transformers_dirs(test_zoo):
    assert test_zoo.domains == domains() and set(test_zoo.experts) == set(domains())
    tok = AutoTokenizer.from_pretrained(test_zoo.tokenizer)
    assert tok.pad_token_id == load_tokenizer().pad_token_id
    ids = tok(["def f(x):\n    return x"], return_tensors="pt")["input_ids"]
    outs = []
    for path in [test_zoo.base, *test_zoo.experts.values()]:
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["model_type"] == "llama" and cfg["vocab_size"] == len(tok)
        assert (path / "tokenizer.json").exists() and (path / "tokenizer_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.hidden_size == zoo_mod.PRESETS["test"]["hidden_size"]
        assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with torch.no_grad():
            outs.append(model(ids).logits)
        assert torch.isfinite(outs[-1]).all()
    # Full fine-tuning: every expert differs from the base in every tensor, MLPs included.
    base = _weights(test_zoo.base)
    for path in test_zoo.experts.values():
        expert = _weights(path)
        assert all(not torch.equal(base[k], expert[k]) for k in base)


def test_cache_hit_trains_nothing(test_zoo, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a cached zoo must not train")

    monkeypatch.setattr(zoo_mod, "_build_base", boom)
    monkeypatch.setattr(zoo_mod, "_build_expert", boom)
    again = build_zoo("test")
    assert again.base == test_zoo.base and again.experts == test_zoo.experts


def test_micro_zoo_is_deterministic_resumable_and_keyed_by_config(tmp_path, monkeypatch):
    a = build_zoo("test", cache_dir=tmp_path / "a", **MICRO)
    b = build_zoo("test", cache_dir=tmp_path / "b", **MICRO)
    for x, y in zip([a.base, *a.experts.values()], [b.base, *b.experts.values()], strict=True):
        assert _same(_weights(x), _weights(y))
    other = build_zoo("test", cache_dir=tmp_path / "a", **{**MICRO, "seed": 1})
    assert other.root != a.root and not _same(_weights(other.base), _weights(a.base))

    # Interrupted after the base and some experts: a rebuild trains only what is missing
    # and reproduces it exactly.
    victim = a.domains[-1]
    kept = _weights(a.experts[victim])
    (a.root / "zoo.json").unlink()
    for f in a.experts[victim].iterdir():
        f.unlink()
    a.experts[victim].rmdir()
    built = []
    real = zoo_mod._build_expert
    monkeypatch.setattr(zoo_mod, "_build_base", lambda *a, **k: pytest.fail("base rebuilt"))
    monkeypatch.setattr(
        zoo_mod,
        "_build_expert",
        lambda cfg, tok, base, d, i: built.append(d) or real(cfg, tok, base, d, i),
    )
    again = build_zoo("test", cache_dir=tmp_path / "a", **MICRO)
    assert built == [victim] and _same(_weights(again.experts[victim]), kept)


def test_bad_preset_and_override_are_named(tmp_path):
    with pytest.raises(ValueError, match="preset must be one of .*'huge'"):
        build_zoo("huge", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="overrides must be among .*'depth'"):
        build_zoo("test", cache_dir=tmp_path, depth=3)


def test_experts_specialise(test_zoo):
    ppl = evaluate_zoo(test_zoo, split="validation", max_batches=8)  # ~8k tokens each
    for d in test_zoo.domains:
        own, base = ppl[d][d], ppl["base"][d]
        assert own < (1 - TEST_GAIN) * base, (d, own, base)
        assert any(ppl[d][o] > ppl["base"][o] for o in test_zoo.domains if o != d), (d, ppl)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_families(family):
    cfg = tiny_config(family)
    assert cfg.model_type == family
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (64, 2, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, 256)
    assert tiny_config(family, hidden_size=96).hidden_size == 96
    m0, m0b, m1 = tiny_model(family), tiny_model(family), tiny_model(family, seed=1)
    assert type(m0).__name__.lower() == f"{family}forcausallm"
    assert all(p.dtype == torch.float32 for p in m0.parameters())
    assert _same(m0.state_dict(), m0b.state_dict())
    assert not _same(m0.state_dict(), m1.state_dict())
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        logits = m0(ids).logits
    assert logits.shape == (2, 9, 256) and torch.isfinite(logits).all()


def test_tiny_family_rejects_unknown():
    with pytest.raises(ValueError, match="family must be one of .*'gpt2'"):
        tiny_config("gpt2")


def test_mlp_only_preset_shares_the_base_and_changes_only_mlps(tmp_path):
    import fastdume
    from fastdume.moe import forced_expert

    # Existing presets keep their configuration (and so their cache keys).
    for name in ("test", "demo"):
        assert "expert_params" not in zoo_mod._resolve(name, {})
        mlp = zoo_mod._resolve(f"{name}-mlp", {})
        assert mlp.pop("expert_params") == "mlp" and mlp == zoo_mod._resolve(name, {})
    with pytest.raises(ValueError, match="expert_params must be one of"):
        build_zoo("test-mlp", cache_dir=tmp_path, expert_params="attn")

    mlp = build_zoo("test-mlp", cache_dir=tmp_path, **MICRO)
    full = build_zoo("test", cache_dir=tmp_path, **MICRO)  # reuses the base built above
    assert mlp.base == full.base and mlp.root != full.root
    base = _weights(mlp.base)
    for d in mlp.domains:
        expert = _weights(mlp.experts[d])
        assert {k for k in base if not torch.equal(base[k], expert[k])} == {
            k for k in base if ".mlp." in k
        }, d
    # Nothing but MLPs differ, so the upcycled MoE under oracle routing is each dense expert.
    moe = fastdume.upcycle([mlp.experts[d] for d in mlp.domains], domains=mlp.domains)
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        for e, d in enumerate(mlp.domains):
            dense = AutoModelForCausalLM.from_pretrained(mlp.experts[d])(ids).logits
            with forced_expert(moe, e):
                assert torch.allclose(moe(ids).logits, dense, atol=1e-4), d
