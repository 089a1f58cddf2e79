"""The command line with --routed model: upcycle, stats, fit, add-expert and remove-expert give
what the Python API gives; bad options exit 2 and write nothing."""

import json

import pytest
import torch
import transformers
from dume_fixtures import make_experts

import fastdume
from fastdume.cli import main
from fastdume.router import RouterStats, collect_stats, fit_router

ROUTING = ["--routed", "model", "--features", "context", "--depth", "single"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastdume.data import documents

    root = tmp_path_factory.mktemp("routed_cli")
    _, dirs = make_experts(root, shared_noise=0.05, vocab_size=4096)  # the shipped tokenizer's
    texts = {}
    for domain, corpus in zip("abc", ["code", "legal", "math"], strict=True):
        texts[domain] = root / f"{domain}.jsonl"
        rows = [json.dumps({"text": t}) for t in documents(corpus, "train")[:2]]
        texts[domain].write_text("\n".join(rows) + "\n")
    return root, dirs, texts


def _batches(texts, domain):
    from fastdume.commands._common import read_documents, text_batches
    from fastdume.data import load_tokenizer

    return list(text_batches(load_tokenizer(), read_documents(texts[domain]), 32, 8))


def _stats(model_dir, texts, domain, out):
    args = ["stats", str(model_dir), "--domain", domain, "--text", str(texts[domain])]
    return main([*args, "--device", "cpu", "--out", str(out), "--seq-len", "32", "--no-progress"])


@pytest.mark.parametrize("features", ["context", "vocab"])
def test_routed_model_commands_match_the_python_api(setup, tmp_path, features):
    root, dirs, texts = setup
    dume = tmp_path / "dume"
    args = ["upcycle", str(dirs["a"]), str(dirs["b"]), "--domains", "a,b", "--out", str(dume)]
    routing = ["--routed", "model", "--features", features, "--depth", "single"]
    assert main([*args, *routing, "--json", str(tmp_path / "up.json")]) == 0
    summary = json.loads((tmp_path / "up.json").read_text())
    assert (summary["routed"], summary["router_features"], summary["router_depth"]) == (
        "model", features, "single")  # fmt: skip
    model = fastdume.upcycle(
        [dirs["a"], dirs["b"]], domains=["a", "b"], routed="model", features=features,
        depth="single",
    )  # fmt: skip
    saved = transformers.AutoModelForCausalLM.from_pretrained(dume)
    for key, value in model.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value), key

    sa, sb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _stats(dume, texts, "a", sa) == 0 and _stats(dume, texts, "b", sb) == 0
    ref = collect_stats(model, "a", _batches(texts, "a"), progress=False)
    ref = collect_stats(model, "b", _batches(texts, "b"), stats=ref, progress=False)
    got = RouterStats.load(sa, model=model) + RouterStats.load(sb, model=model)
    assert got.options == ref.options == {"routed": "model", "features": features,
                                          "depth": "single"}  # fmt: skip
    for d in "ab":
        torch.testing.assert_close(got.colsum(d), ref.colsum(d), rtol=1e-9, atol=1e-9)
        if features == "context":
            torch.testing.assert_close(got.gram(d), ref.gram(d), rtol=1e-9, atol=1e-9)

    assert main(["fit", str(dume), str(sa), str(sb), "--out", str(tmp_path / "fit")]) == 0
    fitted = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fit")
    fit_router(model, ref)
    torch.testing.assert_close(fitted.routers[0].weight, model.routers[0].weight)

    args = ["add-expert", str(tmp_path / "fit"), str(dirs["c"]), "--domain", "c", "--stats"]
    args += [str(sa), str(sb), "--text", str(texts["c"]), "--seq-len", "32"]
    assert main([*args, "--out", str(tmp_path / "abc"), "--no-progress"]) == 0
    grown = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "abc")
    model, ref = fastdume.add_expert(model, dirs["c"], "c", _batches(texts, "c"), ref)
    assert grown.config.domains == ["a", "b", "c"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(grown.state_dict()[key], value, msg=key)

    stats_abc = tmp_path / "abc" / "router_stats.safetensors"
    args = ["remove-expert", str(tmp_path / "abc"), "b", "--stats", str(stats_abc)]
    assert main([*args, "--out", str(tmp_path / "ac"), "--no-progress"]) == 0
    shrunk = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ac")
    model, ref = fastdume.remove_expert(model, "b", ref)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(shrunk.state_dict()[key], value, msg=key)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--routed", "model", "--shared", "base:/nowhere"], "shared must be left at its default"),
        (["--routed", "model", "--features", "ctx"], "features must be"),
        (["--depth", "deep"], "depth must be one of"),
        (["--routed", "model", "--top-k", "2"], "top_k must be 1"),
        (["--routed", "model", "--features", "vocab", "--depth", "layer"], "must be 'single'"),
    ],
)
def test_bad_routing_options_exit_2_and_write_nothing(setup, tmp_path, capsys, extra, message):
    _, dirs, _ = setup
    out = tmp_path / "out"
    assert main(["upcycle", str(dirs["a"]), str(dirs["b"]), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_statistics_of_other_options_are_refused_by_fit(setup, tmp_path, capsys):
    _, dirs, texts = setup
    for name, options in (("ctx", ROUTING), ("tok", ["--routed", "model", "--features", "token"])):
        args = ["upcycle", str(dirs["a"]), str(dirs["b"]), "--domains", "a,b"]
        assert main([*args, "--out", str(tmp_path / name), *options]) == 0
    sa, sb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _stats(tmp_path / "ctx", texts, "a", sa) == 0
    assert _stats(tmp_path / "ctx", texts, "b", sb) == 0
    assert main(["fit", str(tmp_path / "tok"), str(sa), str(sb), "--out", str(tmp_path / "f")]) == 2
    assert "features='context'" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
