"""Run the measurement's trainings on the real multi-process pipeline (fastdume.pipeline).

`pipeline_runner(workdir)` returns a runner with the same contract as fastdume.defense.sim.run,
so run_defense_report(runner=...) measures the detectors on separate stage processes over gloo
instead of the in-process driver. Metrics come back through the launcher's per-rank summary,
hook messages from <out>/hooks/stage<s>_replica<r>.safetensors.
"""

import itertools
import re
from pathlib import Path

from safetensors.torch import load_file

from . import sim

_MSG_KEY = re.compile(r"^(\d+)/(.+)/(\d+)$")


def load_messages(out_dir):
    """{(stage, replica): [(step, tag, tensor), ...]} in the order the hooks sent them."""
    out = {}
    for path in sorted(Path(out_dir, "hooks").glob("stage*_replica*.safetensors")):
        s, r = map(int, re.findall(r"\d+", path.stem))
        rows = []
        for key, t in load_file(str(path)).items():
            m = _MSG_KEY.match(key)
            if m is None:
                raise ValueError(f"hook message key must be 'step/tag/index', got {key!r}")
            rows.append((int(m.group(3)), int(m.group(1)), m.group(2), t))
        out[(s, r)] = [(step, tag, t) for _, step, tag, t in sorted(rows, key=lambda x: x[0])]
    return out


def pipeline_runner(workdir, data="random", timeout=120.0):
    """A runner(cfg, seed, hooks_spec, hooks_kwargs) backed by fastdume.pipeline.launch."""
    from fastdume.pipeline.launch import launch
    from fastdume.pipeline.runtime import PipelineConfig

    work = Path(workdir)
    counter = itertools.count()

    def runner(cfg, seed, spec, kwargs):
        model_dir = work / f"base_{abs(hash(cfg))}"
        if not (model_dir / "config.json").exists():
            sim.base_model(cfg).save_pretrained(model_dir)
        out = work / f"run{next(counter)}_seed{seed}"
        pcfg = PipelineConfig(
            model=str(model_dir),
            data=data,
            out=str(out),
            stages=cfg.stages,
            replicas=cfg.replicas,
            micro_batches=cfg.micro_batches,
            steps=cfg.steps,
            micro_batch_size=cfg.micro_batch,
            seq_len=cfg.seq_len,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup=cfg.warmup,
            max_grad_norm=cfg.clip,
            hooks=spec,
            hook_kwargs=kwargs,
            seed=seed,
            timeout=timeout,
            threads=1,
            save_model=False,
        )
        summary = launch(pcfg)
        ranks = summary["ranks"].values()
        losses = summary["losses"]
        tail = losses[-5:] or [float("nan")]
        return {
            "config": {"replicas": cfg.replicas, "stages": cfg.stages},
            "seed": seed,
            "losses": losses,
            # No held-out evaluation inside the pipeline: the last training losses stand in.
            "val_loss": sum(tail) / len(tail),
            "train_seconds": sum(r["seconds"] for r in ranks),
            "metrics": {(r["stage"], r["replica"]): r["metrics"] for r in ranks},
            "messages": load_messages(out),
        }

    return runner
