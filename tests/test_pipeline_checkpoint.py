"""Per-stage checkpoints: safetensors only, exact restore, incomplete steps ignored."""

import pytest
import torch
from safetensors import safe_open

from fastdume.pipeline import checkpoint
from fastdume.pipeline.optim import lr_lambda, make_optimizer


def _stage(seed):
    torch.manual_seed(seed)
    params = {
        "model.layers.3.mlp.up_proj.weight": torch.nn.Parameter(torch.randn(6, 4)),
        "model.norm.weight": torch.nn.Parameter(torch.randn(4)),
    }
    opt, _ = make_optimizer(list(params.values()), 1e-2, 0.1, 1, 10)
    for _ in range(3):
        loss = sum((p**2).sum() for p in params.values())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return params, opt


def test_save_load_restores_params_and_adam_state(tmp_path):
    params, opt = _stage(0)
    checkpoint.save_stage(tmp_path, 3, 1, params, opt)
    files = sorted(p.name for p in (tmp_path / "step_000003").iterdir())
    assert files == ["stage_1.optim.safetensors", "stage_1.safetensors"]
    with safe_open(tmp_path / "step_000003" / "stage_1.safetensors", "pt") as f:
        assert f.metadata() == {"step": "3", "stage": "1"}
    fresh, fresh_opt = _stage(1)
    checkpoint.load_stage(tmp_path, 3, 1, fresh, fresh_opt)
    for n in params:
        assert torch.equal(fresh[n], params[n])
        want, got = opt.state[params[n]], fresh_opt.state[fresh[n]]
        assert set(got) == set(want) == {"step", "exp_avg", "exp_avg_sq"}
        for k in want:
            assert torch.equal(got[k], want[k])
    # both continue identically
    for ps, o in ((params, opt), (fresh, fresh_opt)):
        sum((p**3).sum() for p in ps.values()).backward()
        o.step()
    for n in params:
        assert torch.equal(fresh[n], params[n])


def test_latest_complete_needs_every_stage(tmp_path):
    params, opt = _stage(0)
    assert checkpoint.latest_complete(tmp_path / "none", 2) is None
    for s in (0, 1):
        checkpoint.save_stage(tmp_path, 2, s, params, opt)
    checkpoint.save_stage(tmp_path, 4, 0, params, opt)  # stage 1 crashed before writing
    assert checkpoint.latest_complete(tmp_path, 2) == 2
    assert not list(tmp_path.rglob("*.tmp*"))


def test_mismatched_stage_is_refused(tmp_path):
    params, opt = _stage(0)
    checkpoint.save_stage(tmp_path, 1, 0, params, opt)
    other = {"model.layers.9.mlp.up_proj.weight": torch.nn.Parameter(torch.randn(6, 4))}
    o, _ = make_optimizer(list(other.values()), 1e-2, 0.0, 1, 10)
    with pytest.raises(ValueError, match="does not match the stage's parameters"):
        checkpoint.load_stage(tmp_path, 1, 0, other, o)


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
