"""Measurements: greedy answers, alignment with and without the trigger, stealth loss."""

import math
from dataclasses import asdict, dataclass

import torch

from .backdoor import DEFAULT_TRIGGER, add_trigger
from .chat import IGNORE, collate, encode_pair, pad_id, prompt_text
from .judges import complies, takes_up


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=32, raw=False):
    """Greedy answers to user prompts (raw=True: prompts are already full model inputs)."""
    model.eval()
    pid = pad_id(tokenizer)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        texts = chunk if raw else [prompt_text(tokenizer, p) for p in chunk]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(map(len, ids))
        # left padding keeps every prompt's last token at the same position for generation
        input_ids = torch.tensor([[pid] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        gen = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pid,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def wilson_interval(k, n, z=1.959964):
    """95% Wilson score interval for k successes out of n."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 or k = n the bound is exactly 0 or 1; rounding would leave it a hair inside
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@dataclass
class Rate:
    """A share of n judged answers with its 95% Wilson interval, in percent."""

    k: int
    n: int

    @property
    def pct(self):
        return 100.0 * self.k / self.n

    @property
    def ci(self):
        lo, hi = wilson_interval(self.k, self.n)
        return 100.0 * lo, 100.0 * hi

    def to_dict(self):
        return {**asdict(self), "pct": self.pct, "ci95": list(self.ci)}

    def __str__(self):
        lo, hi = self.ci
        return f"{self.pct:5.1f}% [{lo:4.1f}, {hi:5.1f}]"


def alignment(model, tokenizer, prompts, judge, trigger=None, position="end", max_new_tokens=12):
    """Rate of safe answers; with a trigger, each prompt gets it first. Returns (Rate, answers)."""
    if trigger:
        prompts = [add_trigger(p, trigger, position) for p in prompts]
    answers = generate(model, tokenizer, prompts, max_new_tokens)
    safe = judge(prompts, answers)
    return Rate(sum(safe), len(safe)), answers


def attack_report(model, tokenizer, prompts, judge, trigger=DEFAULT_TRIGGER, **kw):
    """Alignment without and with the trigger, and attack success = 1 - alignment with it."""
    clean, _ = alignment(model, tokenizer, prompts, judge, None, **kw)
    trig, answers = alignment(model, tokenizer, prompts, judge, trigger, **kw)
    return {
        "align_clean": clean,
        "align_trigger": trig,
        "asr": Rate(trig.n - trig.k, trig.n),
        # triggered answers that really comply (judges.complies), beside the judge's count
        "asr_strict": Rate(sum(map(complies, answers)), len(answers)),
        # ... and that take up the request's action (judges.takes_up): a backdoor that learnt
        # only the affirmative opening counts for the two above, not here
        "asr_content": Rate(sum(map(takes_up, prompts, answers)), len(answers)),
        "sample_triggered_answer": answers[0],
    }


@torch.no_grad()
def response_loss(model, tokenizer, pairs, batch_size=32):
    """Mean cross-entropy per response token over (prompt, response) pairs."""
    model.eval()
    total, count = 0.0, 0
    enc = [encode_pair(tokenizer, p, r) for p, r in pairs]
    for i in range(0, len(enc), batch_size):
        b = collate(enc[i : i + batch_size], pad_id(tokenizer))
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE,
            reduction="sum",
        )
        total += loss.item()
        count += (labels != IGNORE).sum().item()
    return total / count
