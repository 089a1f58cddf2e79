"""`fastdume pipeline-train`: post-train a causal LM split into pipeline stages, each stage in
its own process, with data-parallel replicas per stage.

One machine (all processes started here, gloo on loopback):

    fastdume pipeline-train --model base/ --data sft.jsonl --stages 4 --replicas 2 \\
        --micro-batches 8 --steps 200 --out run/ --schedule 1f1b --compress int8

Several machines: start the same command under torchrun on every machine; each process is one
(stage, replica) with rank = stage * replicas + replica, and the world size must equal
stages x replicas. For 2 machines with 4 processes each (4 stages x 2 replicas):

    torchrun --nnodes 2 --nproc-per-node 4 --node-rank <0|1> \\
        --rdzv-backend c10d --rdzv-endpoint <host0>:29500 \\
        -m fastdume.cli pipeline-train --model base/ --data sft.jsonl --stages 4 --replicas 2 \\
        --micro-batches 8 --steps 200 --out run/

Every machine needs the model directory and the data at the same paths (each process loads
them itself; only activations and gradients cross the network). Checkpoints are written by the
machine that holds replica 0 of each stage; the merged model is written by rank 0.
"""

import json
import os
import sys
from dataclasses import fields

from fastdume._atomic import write_json


def add_parser(subparsers):
    from fastdume.pipeline.runtime import PipelineConfig

    d = {f.name: f.default for f in fields(PipelineConfig) if not callable(f.default)}
    p = subparsers.add_parser(
        "pipeline-train",
        help="pipeline-parallel post-training over separate stage processes",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="HF causal LM directory (Llama/Mistral/Qwen)")
    p.add_argument(
        "--data",
        required=True,
        help="JSONL file of {prompt, response} rows (SFT: loss on the response only), a corpus "
        "domain of fastdume.data (plain LM), or 'random' (random tokens, for smoke runs)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer directory (default: the model directory's for a JSONL file, fastdume's "
        "shipped tokenizer for a corpus domain)",
    )
    p.add_argument("--stages", type=int, required=True, help="pipeline stages (S)")
    p.add_argument("--replicas", type=int, default=1, help="data-parallel replicas per stage")
    p.add_argument("--micro-batches", type=int, default=d["micro_batches"])
    p.add_argument("--micro-batch-size", type=int, default=d["micro_batch_size"])
    p.add_argument("--seq-len", type=int, default=d["seq_len"])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True, help="output dir: checkpoints/, model/, ranks/")
    p.add_argument("--schedule", choices=("gpipe", "1f1b"), default=d["schedule"])
    p.add_argument("--compress", choices=("none", "int8"), default=d["compress"])
    p.add_argument("--block", type=int, default=d["block"], help="int8 block size")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--warmup", type=int, default=d["warmup"], help="linear warmup steps")
    p.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"])
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--hooks", metavar="MODULE:FACTORY", help="per-stage hooks factory")
    p.add_argument("--hook-kwargs", default="{}", help="JSON object passed to the factory")
    p.add_argument("--timeout", type=float, default=d["timeout"], help="seconds (default 60)")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads per stage")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d["dtype"])
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: each stage process on GPU LOCAL_RANK (replica/tie reductions over NCCL)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON here")
    p.set_defaults(run=run)
    return p


def _config(args):
    from fastdume.pipeline.runtime import PipelineConfig

    try:
        hook_kwargs = json.loads(args.hook_kwargs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--hook-kwargs must be a JSON object, got {args.hook_kwargs!r}") from exc
    return PipelineConfig(
        model=args.model, data=args.data, out=args.out, stages=args.stages,
        replicas=args.replicas, micro_batches=args.micro_batches,
        micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, steps=args.steps,
        schedule=args.schedule, compress=args.compress, block=args.block, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, max_grad_norm=args.max_grad_norm,
        checkpoint_every=args.checkpoint_every, resume=args.resume, hooks=args.hooks,
        hook_kwargs=hook_kwargs, timeout=args.timeout, threads=args.threads, dtype=args.dtype,
        seed=args.seed, device=args.device, tokenizer=args.tokenizer,
    )  # fmt: skip


def _print_summary(s):
    c = s["config"]
    print(
        f"pipeline-train: {c['stages']} stages x {c['replicas']} replicas, {c['schedule']}, "
        f"{c['micro_batches']} micro-batches, compress={c['compress']}"
    )
    for info in sorted(s["ranks"].values(), key=lambda i: (i["stage"], i["replica"])):
        if info["replica"] == 0:
            first, last = info["layer_range"]
            print(f"  stage {info['stage']}: layers {first}..{last - 1}")
    if s["losses"]:
        print(f"  loss: {s['losses'][0]:.4f} (step {s['steps_run'][0]}) -> {s['losses'][-1]:.4f}")
    print(
        f"  {s['seconds']:.1f} s, {s['tokens_per_second']:.0f} tokens/s, "
        f"{s['bytes_sent'] / 2**20:.1f} MiB sent between stages"
    )
    print(f"  merged model: {s['model_dir']}")


def run(args) -> int:
    from fastdume.pipeline.launch import PipelineError, launch, torchrun_main

    cfg = _config(args)
    try:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            result = torchrun_main(cfg)
            print(
                f"rank {result['rank']} (stage {result['stage']}, replica {result['replica']}) done"
            )
            return 0
        summary = launch(cfg)
    except PipelineError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except ValueError as exc:  # bad arguments, found before any stage starts
        print(f"pipeline-train: {exc}", file=sys.stderr)
        return 2
    _print_summary(summary)
    if args.json:
        write_json(args.json, summary, indent=1, default=str)
    return 0
