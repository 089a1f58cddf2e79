"""export_mixtral: a plain-transformers Mixtral checkpoint with equal logits, or a refusal."""

import json

import pytest
import torch
import transformers
from tiny_models import tiny_dume

from fastdume.moe import export_mixtral, route


def _unbiased(model, constant=0.0):
    with torch.no_grad():
        for moe in model.dume_layers():
            moe.router.bias.fill_(constant)
    return model


@pytest.mark.parametrize(
    ("family", "top_k", "constant"), [("llama", 1, 0.0), ("llama", 2, 0.25), ("mistral", 2, 0.0)]
)
def test_exported_mixtral_logits_match(family, top_k, constant, tmp_path):
    tied = family == "llama" and top_k == 2
    model = _unbiased(
        tiny_dume(
            family,
            domains=("a", "b", "c", "d"),
            top_k=top_k,
            temperature=0.7,
            tie_word_embeddings=tied,
        ),
        constant,
    )
    export_mixtral(model, tmp_path / "mixtral")
    config = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and "auto_map" not in config
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    assert type(mixtral) is transformers.MixtralForCausalLM
    assert mixtral.config.num_local_experts == 4 and mixtral.config.num_experts_per_tok == top_k
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
        got = mixtral(ids).logits
        # the comparison means something only if the tokens really spread over the experts
        x = model.model.embed_tokens(ids).reshape(-1, 64)
        moe = model.dume_layers()[0]
        _, chosen = route(x, moe.router.weight, moe.router.bias, top_k, moe.temperature)
    assert chosen.unique().numel() >= 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_refuses_a_router_bias_that_differs_between_experts(tmp_path):
    model = tiny_dume("llama")
    _unbiased(model)
    with torch.no_grad():
        model.dume_layers()[1].router.bias[2] = 0.5
    with pytest.raises(ValueError, match="layer 1's router has a bias"):
        export_mixtral(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_refuses_a_base_mixtral_cannot_express(family, tmp_path):
    model = _unbiased(tiny_dume(family))
    with pytest.raises(ValueError, match=f"Llama or Mistral base.*{family}"):
        export_mixtral(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_refuses_attention_bias_and_non_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="attention_bias"):
        export_mixtral(_unbiased(tiny_dume("llama", attention_bias=True)), tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy"):
        export_mixtral(_unbiased(tiny_dume("llama")), tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
