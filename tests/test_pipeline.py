"""Pipeline runtime end to end: separate stage processes over gloo on loopback, checked against
single-process training of the same transformers model."""

import json
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastdume.data.tiny import tiny_model
from fastdume.pipeline.data import IGNORE, build_source
from fastdume.pipeline.launch import PipelineError, launch
from fastdume.pipeline.optim import make_optimizer
from fastdume.pipeline.partition import split_layers
from fastdume.pipeline.runtime import PipelineConfig

STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastdume.data import load_tokenizer

    root = tmp_path_factory.mktemp("pipeline")
    tok = load_tokenizer()
    model = tiny_model("llama", num_hidden_layers=4, vocab_size=len(tok), tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(64):
        a, b = torch.randint(0, 50, (2,), generator=g).tolist()
        rows.append({"prompt": f"User: what is {a} plus {b}? Assistant:", "response": f" {a + b}"})
    data = root / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return root


def _cfg(setup, out, **kw):
    base = dict(
        model=str(setup / "model"),
        data=str(setup / "sft.jsonl"),
        out=str(setup / out),
        stages=2,
        replicas=1,
        micro_batches=2,
        micro_batch_size=2,
        seq_len=24,
        steps=STEPS,
        lr=3e-3,
        warmup=1,
        max_grad_norm=0.5,
        timeout=30,
    )
    base.update(kw)
    return PipelineConfig(**base)


def _reference(cfg):
    """Single-process training of the same HF model on the same global batches."""
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    model.train()
    opt, sched = make_optimizer(
        list(model.parameters()), cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps, cfg.min_lr_ratio
    )
    source = build_source(cfg.data, cfg.model, model.config.vocab_size, cfg.seq_len, seed=cfg.seed)
    size = cfg.replicas * cfg.micro_batches * cfg.micro_batch_size
    losses = []
    for step in range(cfg.steps):
        ids, labels = source.global_batch(step, size)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict()


def _merged(out):
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    return model.state_dict()


def _assert_same_weights(sd, ref, atol):
    assert set(sd) == set(ref)
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def reference(setup):
    return _reference(_cfg(setup, "ref"))


def test_data_masks_prompt_tokens(setup):
    source = build_source(str(setup / "sft.jsonl"), str(setup / "model"), 4096, 24)
    ids, labels = source.global_batch(0, 8)
    assert ids.shape == labels.shape == (8, 24)
    learn = labels != IGNORE
    assert 0 < learn.sum() < ids.numel() / 3  # only the short responses carry loss
    assert torch.equal(labels[learn], ids[learn])


def test_domain_source_is_deterministic_plain_lm():
    from fastdume.data import batches, domains, load_tokenizer

    domain = domains()[0]
    a = build_source(domain, "unused", 4096, 32, needed=32, seed=3)
    b = build_source(domain, "unused", 4096, 32, needed=32, seed=3)
    ids, labels = a.global_batch(1, 8)
    ids2, labels2 = b.global_batch(1, 8)
    assert torch.equal(ids, ids2) and torch.equal(labels, labels2)
    assert not torch.equal(a.global_batch(2, 8)[0], ids)
    # plain LM: every real token is a target; padding (if any) is not
    ref = next(
        iter(
            batches(
                load_tokenizer(), domain, "train", seq_len=32, batch_size=64, max_batches=1, seed=3
            )
        )
    )
    rows = {
        tuple(r.tolist()): m for r, m in zip(ref["input_ids"], ref["attention_mask"], strict=True)
    }
    for r, lab in zip(ids, labels, strict=True):
        mask = rows[tuple(r.tolist())].bool()
        assert torch.equal(lab[mask], r[mask]) and torch.all(lab[~mask] == IGNORE)
    with pytest.raises(ValueError, match="one of the domains"):
        build_source("no-such-domain", "unused", 4096, 32)


def test_four_stages_gpipe_matches_single_process_and_calls_hooks(setup, reference):
    ref_losses, ref_sd = reference
    hooks = "fastdume.pipeline._testing:recording"
    cfg = _cfg(setup, "s4", stages=4, schedule="gpipe", hooks=hooks)
    res = launch(cfg)
    torch.testing.assert_close(
        torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=0, atol=1e-5
    )
    assert ref_losses[-1] < 0.92 * ref_losses[0]  # it really trains
    _assert_same_weights(_merged(setup / "s4"), ref_sd, 1e-5)
    ranges = split_layers(4, 4)
    for info in res["ranks"].values():
        s, m = info["stage"], info["metrics"]
        assert tuple(info["layer_range"]) == ranges[s]
        assert m["before_step"] == m["after_step"] == list(range(STEPS))
        assert all(v == 1.0 for v in m["grads_cover_params"])
        per_step = list(range(cfg.micro_batches)) * STEPS
        assert m.get("activations", []) == (per_step if s < 3 else [])
        assert sorted(m.get("gradients", [])) == (sorted(per_step) if s < 3 else [])
        # 4 layers x 9 tensors, + embeddings on stage 0, + norm and (tied copy of) head last
        assert m["num_params"] == [9 + (1 if s == 0 else 0) + (2 if s == 3 else 0)]
    hooks = load_file(setup / "s4" / "hooks" / "stage0_replica0.safetensors")
    assert list(hooks) == ["0/first_param_model.embed_tokens.weight/0"]


def test_two_stages_two_replicas_1f1b_matches_and_resumes(setup, reference):
    ref_losses, ref_sd = reference
    cfg = _cfg(setup, "s2r2", replicas=2, micro_batches=1, schedule="1f1b", checkpoint_every=2)
    # 2 replicas x 1 micro-batch: the same global batch of 4 sequences as the reference
    res = launch(cfg)
    torch.testing.assert_close(
        torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=0, atol=1e-5
    )
    final = _merged(setup / "s2r2")
    _assert_same_weights(final, ref_sd, 1e-5)
    ckpt = setup / "s2r2" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_000002", "step_000004"]
    # resume from step 2 in a fresh directory: the same weights as the uninterrupted run
    out2 = setup / "resumed"
    (out2 / "checkpoints").mkdir(parents=True)
    (ckpt / "step_000002").rename(out2 / "checkpoints" / "step_000002")
    res2 = launch(_cfg(setup, "resumed", replicas=2, micro_batches=1, resume=True))
    assert res2["steps_run"] == [2, 3]
    torch.testing.assert_close(
        torch.tensor(res2["losses"]), torch.tensor(res["losses"][2:]), rtol=0, atol=0
    )
    _assert_same_weights(_merged(out2), final, 0)


def test_int8_streaming_loss_within_two_percent(setup, reference):
    ref_losses, _ = reference
    res = launch(_cfg(setup, "int8", compress="int8", block=64))
    assert abs(res["losses"][-1] - ref_losses[-1]) <= 0.02 * ref_losses[-1]
    assert res["losses"] != ref_losses  # the codec really was in the path


def test_killed_stage_fails_everyone_fast(setup):
    timeout = 10
    cfg = _cfg(
        setup,
        "kill",
        stages=3,
        micro_batches=3,
        steps=3,
        timeout=timeout,
        hooks="fastdume.pipeline._testing:kill_stage",
        hook_kwargs={"victim": 1},
    )
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as info:
        launch(cfg)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert "stage 1 replica 0 (rank 1): process died (killed by signal 9)" in msg
    for s in (0, 2):  # the survivors reported their own clear error, not a timeout kill
        assert f"stage {s} replica 0 (rank {s}): PeerError: stage {s}:" in msg
    assert "did not exit in time" not in msg
    assert elapsed < timeout + 30


def test_cli_writes_summary_and_loadable_model(setup, reference, capsys):
    from fastdume.cli import main

    out, js = setup / "cli", setup / "cli.json"
    argv = [
        "pipeline-train", "--model", str(setup / "model"), "--data", str(setup / "sft.jsonl"),
        "--stages", "2", "--micro-batches", "2", "--micro-batch-size", "2", "--seq-len", "24",
        "--steps", str(STEPS), "--out", str(out), "--lr", "3e-3", "--warmup", "1",
        "--max-grad-norm", "0.5", "--schedule", "gpipe", "--json", str(js),
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(js.read_text())
    torch.testing.assert_close(
        torch.tensor(summary["losses"]), torch.tensor(reference[0]), rtol=0, atol=1e-5
    )
    assert "stage 1: layers 2..3" in capsys.readouterr().out
    _assert_same_weights(_merged(out), reference[1], 1e-5)
    bad = argv[:]
    bad[bad.index("--stages") + 1] = "9"
    assert main(bad) == 1
    assert "num_stages must be in 1..4 (layers), got 9" in capsys.readouterr().err


@pytest.mark.gpu
def test_two_stages_on_cuda_match_single_process(setup, reference):
    res = launch(_cfg(setup, "cuda", device="cuda", compress="int8", block=64))
    ref_losses, _ = reference
    assert abs(res["losses"][-1] - ref_losses[-1]) <= 0.02 * ref_losses[-1]
    res = launch(_cfg(setup, "cuda_none", device="cuda"))
    torch.testing.assert_close(
        torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=0, atol=1e-4
    )
    _assert_same_weights(_merged(setup / "cuda_none"), reference[1], 1e-4)


@pytest.mark.slow
def test_same_command_under_torchrun(setup, reference):
    import subprocess
    import sys

    from fastdume.pipeline.launch import _free_port

    out = setup / "torchrun"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(_free_port()), "-m", "fastdume.cli", "pipeline-train",
        "--model", str(setup / "model"), "--data", str(setup / "sft.jsonl"), "--stages", "2",
        "--micro-batches", "2", "--micro-batch-size", "2", "--seq-len", "24",
        "--steps", str(STEPS), "--out", str(out), "--lr", "3e-3", "--warmup", "1",
        "--max-grad-norm", "0.5",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=300)
    last = json.loads((out / "ranks" / "rank1.json").read_text())
    losses = [last["losses"][str(s)] for s in range(STEPS)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[0]), rtol=0, atol=1e-5)
    _assert_same_weights(_merged(out), reference[1], 1e-5)


def test_hung_stage_times_out_and_is_killed(setup):
    timeout = 3
    cfg = _cfg(
        setup,
        "hang",
        stages=3,
        micro_batches=2,
        steps=3,
        timeout=timeout,
        hooks="fastdume.pipeline._testing:hang_stage",
    )
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as info:
        launch(cfg)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert "stage 1 replica 0 (rank 1): did not exit in time and was killed" in msg
    assert "stage 2 replica 0 (rank 2): PeerError: stage 2: receiving activations" in msg
    assert elapsed < 3 * timeout + 10 + 30


def test_a_model_without_tokenizer_is_refused_up_front_and_tokenizer_names_one(
    setup, tmp_path, capsys
):
    from fastdume.cli import main

    bare = tmp_path / "bare"
    tiny_model("llama", num_hidden_layers=2, vocab_size=256).save_pretrained(bare)
    argv = ["pipeline-train", "--model", str(bare), "--data", str(setup / "sft.jsonl")]
    argv += ["--stages", "2", "--steps", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer files" in err and "--tokenizer DIR" in err
    assert not (tmp_path / "out").exists()  # refused before anything started
    # --tokenizer: the same rows as with the tokenizer stored beside the model
    named = build_source(
        str(setup / "sft.jsonl"), str(bare), 4096, 24, tokenizer_dir=setup / "model"
    )
    own = build_source(str(setup / "sft.jsonl"), str(setup / "model"), 4096, 24)
    assert torch.equal(named.global_batch(0, 8)[0], own.global_batch(0, 8)[0])


def test_a_vocabulary_overflow_names_the_tokenizer_used():
    with pytest.raises(ValueError, match="shipped tokenizer.*--tokenizer DIR"):
        build_source("code", "unused", 256, 24, needed=4)
