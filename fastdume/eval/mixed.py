"""Mixed-domain sequences: domain a's text, then domain b's, in one row.

A router that reads the running mean of the features so far (features="context") sees domain
a's tokens long after the text has switched to b; this measures how much that costs. Every row
is the first S/2 real tokens of one of a's windows followed by the first S/2 tokens of one of
b's (S = the batches' sequence length), for every ordered pair a != b. Per half: perplexity of
the half's target tokens (the first token of b is predicted from a's last, and counts to the
second half) and, for DUME models, routing accuracy (share of the half's real tokens whose
decision is the half's domain's expert, mean over routers), plus the accuracy at every position
(the lag curve). Retention of a half = the dense expert of the half's domain on the same rows /
the model, so the reference for the second half also reads domain a's text first.
"""

import contextlib
import math

import torch
import torch.nn.functional as F

from fastdume.eval.metrics import decision_hook, num_routers

HALVES = ("first", "second")


def _halves(batches_of, domain, split, half, rows, full):
    """Up to `rows` (ids, mask) pairs of `half` tokens: each window's start. full=True keeps only
    windows with `half` real tokens (a first half must not end in padding)."""
    out = []
    for batch in batches_of(domain, split):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            if ids.shape[0] < half:
                raise ValueError(f"batches of {domain!r} are shorter than half={half} tokens")
            real = int(mask[:half].sum())
            if real == half or (not full and real >= 2):
                out.append((ids[:half], mask[:half]))
                if len(out) == rows:
                    return out
    return out


def mixed_batch(batches_of, a, b, rows, split="test"):
    """One batch {"input_ids", "attention_mask"} [n, 2 * half] of a-then-b rows (n <= rows),
    half = the batches' sequence length // 2 -> (batch, half)."""
    first = next(iter(batches_of(a, split)))["input_ids"]
    half = first.shape[1] // 2
    if half < 2:
        raise ValueError(f"mixed rows need a sequence length >= 4, got {first.shape[1]}")
    heads = _halves(batches_of, a, split, half, rows, full=True)
    tails = _halves(batches_of, b, split, half, rows, full=False)
    n = min(len(heads), len(tails))
    if n == 0:
        raise ValueError(f"no mixed rows for {a!r} then {b!r} on split {split!r}")
    ids = torch.stack([torch.cat([heads[i][0], tails[i][0]]) for i in range(n)])
    mask = torch.stack([torch.cat([heads[i][1], tails[i][1]]) for i in range(n)])
    return {"input_ids": ids, "attention_mask": mask}, half


def _half_nll(logits, ids, mask, half):
    """Summed next-token NLL and target count of each half (target position decides)."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    target = mask[:, 1:].bool() & mask[:, :-1].bool()
    second = torch.arange(1, ids.shape[1]) >= half  # index of the target token
    out = []
    for part in (target & ~second, target & second):
        out.append((float((nll * part).sum()), int(part.sum())))
    return out


@torch.no_grad()
def evaluate_mixed(model, batches_of, domains, rows=8, split="test", routing=False):
    """-> {"pairs": {"a>b": {"ppl": {half: ppl}, "routing": {half: acc} | None}},
    "curve": [routing accuracy per position, mean over pairs and routers] | None}."""
    model.eval()
    pairs, hits, seen = {}, None, None
    for a in domains:
        for b in domains:
            if a == b:
                continue
            batch, half = mixed_batch(batches_of, a, b, rows, split)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            expected = torch.full(ids.shape, domains.index(b))
            expected[:, :half] = domains.index(a)
            keep = mask.bool()
            per_router = []  # (hits [S], tokens [S]) of each decision

            def record(index, decided, expected=expected, keep=keep, per_router=per_router):
                good = (decided.cpu() == expected) & keep
                per_router.append((good.sum(0), keep.sum(0)))

            with decision_hook(model, record) if routing else contextlib.nullcontext():
                logits = model(input_ids=ids, attention_mask=mask).logits
            parts = _half_nll(logits, ids, mask, half)
            for part, (_, count) in zip(HALVES, parts, strict=True):
                if count == 0:
                    raise ValueError(f"the {part} halves of {a!r}>{b!r} hold no target tokens")
            entry = {"ppl": {h: math.exp(s / n) for h, (s, n) in zip(HALVES, parts, strict=True)},
                     "routing": None}  # fmt: skip
            if routing:
                if len(per_router) != num_routers(model):
                    raise RuntimeError(f"expected {num_routers(model)} decisions, saw "
                                       f"{len(per_router)}")  # fmt: skip
                h = sum(p[0] for p in per_router).double()
                t = sum(p[1] for p in per_router).double()
                entry["routing"] = {"first": float(h[:half].sum() / t[:half].sum()),
                                    "second": float(h[half:].sum() / t[half:].sum())}  # fmt: skip
                hits = h if hits is None else hits + h
                seen = t if seen is None else seen + t
            pairs[f"{a}>{b}"] = entry
    curve = None if hits is None else (hits / seen.clamp_min(1)).tolist()
    return {"pairs": pairs, "curve": curve}


def mixed_retention(reference, result):
    """reference: {domain: evaluate_mixed of that domain's dense expert}; result: the model's.

    -> {"per_pair": {"a>b": {half: retention}}, half: {"retention": mean over pairs,
    "routing": mean over pairs | None}}; the first half of a>b is scored against dense a,
    the second against dense b."""
    out = {"per_pair": {}}
    for pair, entry in result["pairs"].items():
        a, b = pair.split(">")
        ref = {"first": reference[a]["pairs"][pair]["ppl"]["first"],
               "second": reference[b]["pairs"][pair]["ppl"]["second"]}  # fmt: skip
        out["per_pair"][pair] = {h: ref[h] / entry["ppl"][h] for h in HALVES}
    for h in HALVES:
        rets = [r[h] for r in out["per_pair"].values()]
        accs = [e["routing"][h] for e in result["pairs"].values() if e["routing"]]
        out[h] = {"retention": sum(rets) / len(rets),
                  "routing": sum(accs) / len(accs) if accs else None}  # fmt: skip
    return out
