"""Per-stage checkpoints: parameters and AdamW state as safetensors (no pickle).

Layout: <dir>/step_<N>/stage_<s>.safetensors (parameters, HF names) and
stage_<s>.optim.safetensors ("<name>.exp_avg", "<name>.exp_avg_sq", "<name>.step"), with the
step in the metadata. Each file is written under a temporary name and renamed, so a crash never
leaves half a checkpoint; a step counts as complete only when every stage's files are there.
"""

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastdume._atomic import save_safetensors

_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root, step):
    return Path(root) / f"step_{step:06d}"


def save_stage(root, step, stage, params, optimizer):
    """Write the stage's parameters and optimiser state after `step` optimiser steps."""
    d = step_dir(root, step)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"step": str(step), "stage": str(stage)}
    tensors = {n: p.detach().cpu().contiguous() for n, p in params.items()}
    save_safetensors(d / f"stage_{stage}.safetensors", tensors, meta)
    state = {}
    by_param = {id(p): n for n, p in params.items()}
    for p, st in optimizer.state.items():
        name = by_param[id(p)]
        for key, value in st.items():
            state[f"{name}.{key}"] = torch.as_tensor(value).detach().cpu().clone().contiguous()
    save_safetensors(d / f"stage_{stage}.optim.safetensors", state, meta)


def latest_complete(root, num_stages):
    """Highest step whose checkpoint has every stage's files, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and all(
            (child / f"stage_{s}.safetensors").exists()
            and (child / f"stage_{s}.optim.safetensors").exists()
            for s in range(num_stages)
        ):
            steps.append(int(m.group(1)))
    return max(steps) if steps else None


def load_stage(root, step, stage, params, optimizer):
    """Restore parameters and optimiser state in place (names must match exactly)."""
    d = step_dir(root, step)
    saved = load_file(d / f"stage_{stage}.safetensors")
    if set(saved) != set(params):
        missing, extra = set(params) - set(saved), set(saved) - set(params)
        raise ValueError(
            f"checkpoint {d} stage {stage} does not match the stage's parameters: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    state = load_file(d / f"stage_{stage}.optim.safetensors")
    for n, p in params.items():
        keys = {k[len(n) + 1 :]: v for k, v in state.items() if k.rsplit(".", 1)[0] == n}
        if keys:
            # AdamW keeps "step" on the CPU and the moments next to the parameter
            optimizer.state[p] = {
                k: v.clone() if k == "step" else v.to(p.device) for k, v in keys.items()
            }
