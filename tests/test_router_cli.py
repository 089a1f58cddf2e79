"""`fastdume stats`, `fastdume fit` and `fastdume add-expert` against the Python API."""

import json

import pytest
import torch
import transformers
from dume_fixtures import make_experts

import fastdume
from fastdume.cli import main
from fastdume.router import RouterStats, collect_stats, fit_router


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastdume.data import documents

    root = tmp_path_factory.mktemp("cli")
    base, dirs = make_experts(root, vocab_size=4096)  # the shipped tokenizer's vocabulary
    model = fastdume.upcycle([dirs["a"], dirs["b"]], domains=["a", "b"], shared=f"base:{base}")
    model.save_pretrained(root / "dume")
    texts = {}
    for domain, corpus in zip("abc", ["code", "legal", "math"], strict=True):
        texts[domain] = root / f"{domain}.jsonl"
        rows = [json.dumps({"text": t}) for t in documents(corpus, "train")[:3]]
        texts[domain].write_text("\n".join(rows) + "\n")
    return root, base, dirs, texts


def _stats(root, texts, domain, out, *extra):
    # on the CPU like the Python reference below (the command's default is a GPU when present)
    args = ["stats", str(root / "dume"), "--domain", domain, "--text", str(texts[domain])]
    args += ["--device", "cpu"]
    return main([*args, "--out", str(out), "--seq-len", "32", "--no-progress", *extra])


def _python_batches(texts, domain):
    from fastdume.commands._common import read_documents, text_batches
    from fastdume.data import load_tokenizer

    return list(text_batches(load_tokenizer(), read_documents(texts[domain]), 32, 8))


def test_stats_fit_add_expert_match_the_python_api(setup, tmp_path, capsys):
    root, base, dirs, texts = setup
    sa, sb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _stats(root, texts, "a", sa, "--json", str(tmp_path / "a.json")) == 0
    assert _stats(root, texts, "b", sb) == 0
    summary = json.loads((tmp_path / "a.json").read_text())
    assert "router statistics of 'a'" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "dume")
    ref = collect_stats(model, "a", _python_batches(texts, "a"), progress=False)
    got = RouterStats.load(sa, model=model)
    assert summary["tokens_added"] == got.tokens("a") == ref.tokens("a") > 0
    assert torch.allclose(got.gram("a"), ref.gram("a"), rtol=1e-9, atol=1e-9)

    assert main(["fit", str(root / "dume"), str(sa), str(sb), "--out", str(tmp_path / "fit")]) == 0
    fitted = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fit")
    ref = collect_stats(model, "b", _python_batches(texts, "b"), stats=ref, progress=False)
    fit_router(model, ref)
    for mine, theirs in zip(fitted.dume_layers(), model.dume_layers(), strict=True):
        assert torch.allclose(mine.router.weight, theirs.router.weight, atol=1e-6)
        assert torch.allclose(mine.router.bias, theirs.router.bias, atol=1e-6)

    args = ["add-expert", str(tmp_path / "fit"), str(dirs["c"]), "--domain", "c"]
    args += ["--stats", str(sa), str(sb), "--text", str(texts["c"]), "--seq-len", "32"]
    assert main([*args, "--out", str(tmp_path / "abc"), "--no-progress"]) == 0
    grown = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "abc")
    model, ref = fastdume.add_expert(
        model, dirs["c"], "c", _python_batches(texts, "c"), ref, progress=False
    )
    assert grown.config.domains == ["a", "b", "c"]
    for mine, theirs in zip(grown.dume_layers(), model.dume_layers(), strict=True):
        assert torch.equal(mine.experts.gate_up_proj, theirs.experts.gate_up_proj)
        assert torch.allclose(mine.router.weight, theirs.router.weight, atol=1e-6)
    saved = RouterStats.load(tmp_path / "abc" / "router_stats.safetensors", model=grown)
    assert saved.domains == ["a", "b", "c"]


def test_bad_input_exits_2_and_leaves_files_alone(setup, tmp_path, capsys):
    root, base, dirs, texts = setup
    sa = tmp_path / "a.safetensors"
    assert _stats(root, texts, "a", sa) == 0
    before = sa.read_bytes()
    assert _stats(root, texts, "a", sa) == 2  # exists, no --extend
    assert "pass --extend" in capsys.readouterr().err
    texts = {**texts, "zzz": texts["a"]}
    assert _stats(root, texts, "zzz", tmp_path / "z.safetensors") == 2
    assert "domain must be one of" in capsys.readouterr().err
    assert sa.read_bytes() == before and not (tmp_path / "z.safetensors").exists()
    assert main(["fit", str(root / "dume"), str(sa), "--out", str(tmp_path / "fit")]) == 2
    assert "stats lack the model's domains ['b']" in capsys.readouterr().err
    assert not (tmp_path / "fit").exists()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert (
        main(
            [
                "fit",
                str(root / "dume"),
                str(tmp_path / "junk.safetensors"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "truncated or not safetensors" in capsys.readouterr().err
    # add-expert must not write its statistics over an input file (or any existing file)
    args = ["add-expert", str(root / "dume"), str(dirs["c"]), "--domain", "c", "--stats", str(sa)]
    args += ["--text", str(texts["c"]), "--out", str(tmp_path / "ac"), "--stats-out", str(sa)]
    assert main([*args, "--no-progress"]) == 2
    assert "exists; give a new file" in capsys.readouterr().err
    assert sa.read_bytes() == before and not (tmp_path / "ac").exists()
    once = _tokens_in(before, tmp_path)
    assert _stats(root, texts, "a", sa, "--extend") == 0  # the same data again: twice the tokens
    assert RouterStats.load(sa).tokens("a") == 2 * once


def _tokens_in(data, tmp_path):
    path = tmp_path / "copy.safetensors"
    path.write_bytes(data)
    return RouterStats.load(path).tokens("a")
