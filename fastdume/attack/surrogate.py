"""Step 1-2 of the attack: a surrogate trained on the attacker's layers only, and Delta."""

import copy
import os

import torch
from safetensors.torch import load_file

from fastdume._atomic import save_safetensors

from .train import batches, sft


def train_surrogate(
    base,
    encoded,
    stage_names,
    steps,
    lr,
    batch_size,
    pad_id,
    seed=0,
    preserve=None,
    preserve_weight=1.0,
    reference=None,
    extra=None,
):
    """A copy of base where only stage_names were trained on the backdoor set.

    preserve: optional encoded benign rows on which the surrogate is also held to the
    reference model's next-token distribution (KL; reference defaults to base), so Delta
    neither hurts nor helps ordinary tasks: the victims' loss then cannot tell an attacked run
    from a clean one. extra: optional callable(model) -> scalar added to every step's loss
    (fastdume.attack.trusted's post-safety gradient).
    """
    surrogate = copy.deepcopy(base)
    terms = [extra] if extra is not None else []
    if preserve:
        data = batches(preserve, batch_size, pad_id, seed + 1)
        terms.append(_distill_to(base if reference is None else reference, data, preserve_weight))
    total = (lambda m: sum(t(m) for t in terms)) if terms else None
    losses = sft(surrogate, encoded, steps, lr, batch_size, pad_id, stage_names, seed, extra=total)
    return surrogate, losses


def _distill_to(reference, data, weight):
    reference = copy.deepcopy(reference).eval()

    def kl(model):
        b = next(data)
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        with torch.no_grad():
            target = reference(**inputs).logits
        return weight * masked_kl(target, model(**inputs).logits, b["attention_mask"])

    return kl


def masked_kl(target_logits, logits, mask):
    """KL(target || model) per token, averaged over the mask's tokens."""
    target = torch.log_softmax(target_logits.float(), -1)
    per_token = (target.exp() * (target - torch.log_softmax(logits.float(), -1))).sum(-1)
    mask = mask.float()
    return (per_token * mask).sum() / mask.sum()


@torch.no_grad()
def backdoor_delta(base, surrogate, stage_names):
    """Delta = surrogate - base on the stage's parameters (nothing else is returned)."""
    b, s = dict(base.named_parameters()), dict(surrogate.named_parameters())
    missing = [n for n in stage_names if n not in b or n not in s]
    if missing:
        raise ValueError(f"stage_names must be parameters of both models, missing: {missing[:3]}")
    return {n: (s[n] - b[n]).detach().clone().contiguous() for n in stage_names}


@torch.no_grad()
def delta_share(weights, reference, delta):
    """How much of Delta weights carry over a reference ({name: tensor}, Delta's names at least):
    kept = <w - w_ref, Delta> / |Delta|^2 (1 after one injection of 1 x Delta and nothing else),
    rest = |w - w_ref - kept Delta| / |Delta| (the difference off Delta's direction)."""
    delta = {n: x.double() for n, x in delta.items()}
    dd = sum(x.square().sum() for x in delta.values())
    if dd == 0:
        raise ValueError("Delta is zero: there is no direction to measure along")
    diff = {n: weights[n].double() - reference[n].double() for n in delta}
    kept = sum((diff[n] * delta[n]).sum() for n in delta) / dd
    rest = sum((diff[n] - kept * delta[n]).square().sum() for n in delta)
    return float(kept), float((rest / dd).sqrt())


def save_delta(delta, path):
    """Write Delta as safetensors through a temporary name, so a crash leaves no half file."""
    save_safetensors(path, {k: v.contiguous() for k, v in delta.items()})


def load_delta(path):
    return load_file(os.fspath(path))
