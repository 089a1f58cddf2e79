"""Run the victims' post-training through the real multi-process pipeline (fastdume.pipeline)."""

import json
from pathlib import Path

from fastdume._atomic import atomic_file

from .chat import prompt_text
from .surrogate import save_delta

HOOK_SPEC = "fastdume.attack.inject:make_hooks"


def write_sft_jsonl(tokenizer, pairs, path):
    """The pipeline's {"prompt", "response"} rows, with the chat template already applied,
    so the pipeline tokenises exactly what fastdume.attack.chat.encode_pair does."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for p, r in pairs:
            row = {"prompt": prompt_text(tokenizer, p), "response": " " + r.strip()}
            f.write(json.dumps(row) + "\n")
    return path


def pipeline_post_train(
    model,
    tokenizer,
    pairs,
    workdir,
    steps,
    lr,
    stages=4,
    replicas=1,
    batch_size=32,
    micro_batches=4,
    seq_len=48,
    delta=None,
    schedule=None,
    attacker_stage=1,
    attacker_replica=0,
    seed=0,
    timeout=120.0,
    detectors=None,
):
    """Post-train `model` on (prompt, response) pairs in a real S x R pipeline.

    With `delta` (name -> tensor) and `schedule` (Schedule fields), the attacker's stage and
    replica run the backdoor injection hook. detectors: names of fastdume.defense detectors to
    run on every stage (after the attack's hook); their metrics are in the summary's "ranks".
    Returns (merged model, pipeline summary).
    """
    from transformers import AutoModelForCausalLM

    from fastdume.pipeline.launch import launch
    from fastdume.pipeline.runtime import PipelineConfig

    per_replica = batch_size // replicas
    if batch_size % replicas or per_replica % micro_batches:
        raise ValueError(
            f"batch_size={batch_size} must split into replicas={replicas} x "
            f"micro_batches={micro_batches} equal micro-batches"
        )
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(work / "start")
    tokenizer.save_pretrained(work / "start")
    data = write_sft_jsonl(tokenizer, pairs, work / "post.jsonl")
    hooks, kwargs = None, {}
    if delta is not None:
        save_delta(delta, work / "delta.safetensors")
        hooks = HOOK_SPEC
        kwargs = {
            "delta": str(work / "delta.safetensors"),
            "attacker_stage": attacker_stage,
            "attacker_replica": attacker_replica,
            **(schedule or {}),
        }
    if detectors:
        from .defend import demo_hooks

        hooks, kwargs = demo_hooks(kwargs if hooks else None, detectors)
    cfg = PipelineConfig(
        model=str(work / "start"),
        data=str(data),
        out=str(work / "run"),
        stages=stages,
        replicas=replicas,
        micro_batches=micro_batches,
        micro_batch_size=per_replica // micro_batches,
        steps=steps,
        seq_len=seq_len,
        lr=lr,
        warmup=0,
        min_lr_ratio=1.0,
        hooks=hooks,
        hook_kwargs=kwargs,
        seed=seed,
        timeout=timeout,
        threads=1,
    )
    summary = launch(cfg)
    merged = AutoModelForCausalLM.from_pretrained(summary["model_dir"]).eval()
    return merged, summary
