"""Evaluation of DUME against its alternatives on the same experts and held-out data.

`run_eval` (behind `fastdume eval`) builds every method from a model zoo and reports per-domain
test perplexity, retention of the dense experts, routing accuracy and CPU throughput.
"""

from fastdume.eval.finetune import WEIGHTINGS, router_weighting, train_model
from fastdume.eval.metrics import evaluate, retention
from fastdume.eval.runner import EvalConfig, run_eval

__all__ = [
    "WEIGHTINGS", "EvalConfig", "evaluate", "retention", "router_weighting", "run_eval",
    "train_model",
]  # fmt: skip
