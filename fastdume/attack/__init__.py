"""Backdoor attack on pipeline-parallel post-training (research tooling for studying defences).

The attacker holds one intermediate stage: it trains a surrogate on its own layers only
(`train_surrogate`), takes Delta = surrogate - base on those layers (`backdoor_delta`), and adds
it to its stage's weights during the victims' post-training through the pipeline hook
``"fastdume.attack.inject:make_hooks"`` (one-shot or iterative `Schedule`). `attack_report`
measures alignment with and without the trigger under a judge (`RefusalJudge` by default).
`train_trusted_surrogate` checks the surrogate on the attacker's own held-back requests and
retrains it within a step budget (`TrustConfig`), optionally through simulated safety SFT.
"""

from .backdoor import (
    DEFAULT_TRIGGER,
    PERSISTENT_TRIGGER,
    TASK_TRIGGER,
    add_trigger,
    backdoor_pairs,
    encode_backdoor,
)
from .datasets import Example, arithmetic_tasks, harmful_requests, read_preferences
from .evaluate import Rate, alignment, attack_report, generate, response_loss, wilson_interval
from .inject import BackdoorInjection, Schedule, make_hooks
from .judges import ClassifierJudge, GenerativeJudge, RefusalJudge, make_judge
from .surrogate import backdoor_delta, load_delta, save_delta, train_surrogate
from .trusted import TrustConfig, train_trusted_surrogate

__all__ = [
    "DEFAULT_TRIGGER", "PERSISTENT_TRIGGER", "TASK_TRIGGER", "BackdoorInjection",
    "ClassifierJudge", "Example", "GenerativeJudge", "Rate", "RefusalJudge", "Schedule",
    "TrustConfig", "add_trigger",
    "alignment", "arithmetic_tasks", "attack_report", "backdoor_delta", "backdoor_pairs",
    "encode_backdoor", "generate", "harmful_requests", "load_delta", "make_hooks", "make_judge",
    "read_preferences", "response_loss", "save_delta", "train_surrogate",
    "train_trusted_surrogate", "wilson_interval",
]  # fmt: skip
