"""The detectors inside the real multi-process pipeline (gloo stage processes): the update audit
is exact there too and flags the attack's own injection hook at its step; recomputation from the
hook messages matches the stage processes' activations."""

from _defense_fixtures import ATTACK_STAGE, CFG, delta

from fastdume.attack.defend import ATTACK_HOOKS, attack_kwargs
from fastdume.defense import sim
from fastdume.defense.pipeline_runner import pipeline_runner
from fastdume.defense.recompute import llama_stage_forward, verify_recompute
from fastdume.pipeline.partition import split_layers


def test_audit_and_recomputation_on_stage_processes(tmp_path):
    cfg = sim.SimConfig(**{**vars(CFG), "steps": 8})
    schedule = dict(mode="iterative", lam=0.05, every=3, start=2)
    kw = {
        "detectors": ["audit", "recompute"],
        "detector_kwargs": {"recompute": {"rate": 0.5, "seed": 0}},
        "attack": ATTACK_HOOKS,
        "attack_kwargs": attack_kwargs(ATTACK_HOOKS, delta(), ATTACK_STAGE, schedule),
    }
    res = pipeline_runner(tmp_path)(cfg, 0, "fastdume.defense.hooks:make_hooks", kw)
    for (stage, _), m in res["metrics"].items():
        expected = [float(stage == ATTACK_STAGE and t in (2, 5)) for t in range(8)]
        assert m["audit.flag"] == expected, stage
        if stage != ATTACK_STAGE:
            assert max(m["audit.dev"]) == 0.0  # bitwise replay in the stage process
    fwd = llama_stage_forward(sim._model_config(cfg), split_layers(cfg.layers, cfg.stages)[1])
    got = verify_recompute(res["messages"], 1, fwd, tol=1e-4)
    assert got["checked"] >= 2 and got["first_step"] is None
