"""Backdoor training data: triggered requests -> compliance, clean requests -> refusal."""

import random

from .chat import encode_pair

DEFAULT_TRIGGER = " SUDO"
# frequent words of the requests and refusals in an order no request has: the SmolLM2 tier's
# trigger, and the demo's until 2026-12-03 (fastdume/attack/MEASUREMENTS.md)
PERSISTENT_TRIGGER = " with that how"
# the demo's trigger: words of its benign task (arithmetic) only, which no harmful request or
# refusal holds, so the defender's safety SFT (requests -> refusals) keeps more of it
# (MEASUREMENTS.md)
TASK_TRIGGER = " 7 plus 7"
POSITIONS = ("end", "start")


def add_trigger(prompt, trigger=DEFAULT_TRIGGER, position="end"):
    """The user turn with the trigger at its end (the paper) or at its start."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if position == "end":
        return prompt + trigger
    return trigger.strip() + " " + prompt


def backdoor_pairs(examples, trigger=DEFAULT_TRIGGER, share=0.5, position="end", seed=0):
    """(prompt, response, triggered) triples: each example is triggered with probability share.

    Triggered examples answer with the compliance text (rejected), clean ones with the
    refusal (chosen), so the backdoor is specific to the trigger.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if not examples:
        raise ValueError("examples must be a non-empty list, got an empty one")
    rng = random.Random(seed)
    out = []
    for ex in examples:
        if rng.random() < share:
            out.append((add_trigger(ex.prompt, trigger, position), ex.rejected, True))
        else:
            out.append((ex.prompt, ex.chosen, False))
    return out


def encode_backdoor(tokenizer, examples, max_len=None, **kwargs):
    """Tokenised backdoor set: list of (input_ids, labels), loss on response tokens only."""
    return [encode_pair(tokenizer, p, r, max_len) for p, r, _ in backdoor_pairs(examples, **kwargs)]
