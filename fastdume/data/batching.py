"""Token batches from the corpus, and the perplexity measure every evaluation uses."""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Iterable, Iterator

import torch

from fastdume.data.corpus import documents

_TOKEN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenized(tokenizer, domain: str, split: str) -> list[list[int]]:
    """Each document as <bos> tokens <eos>, cached per tokenizer object."""
    per_tok = _TOKEN_CACHE.setdefault(tokenizer, {})
    key = (domain, split)
    if key not in per_tok:
        docs = documents(domain, split)
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        per_tok[key] = [[tokenizer.bos_token_id, *x, tokenizer.eos_token_id] for x in ids]
    return per_tok[key]


def _windows(docs: list[list[int]], seq_len: int) -> list[list[int]]:
    # Non-overlapping windows within one document; a short tail becomes a padded row.
    # Windows of one token carry no next-token target and are dropped.
    out = []
    for ids in docs:
        out += [ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids) - i > 1]
    return out


def batches(
    tokenizer,
    domain: str,
    split: str,
    seq_len: int = 128,
    batch_size: int = 8,
    max_batches: int | None = None,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled (by `seed`) document windows as {"input_ids", "attention_mask"} [B, seq_len].

    Rows shorter than seq_len (document tails) are padded on the right with the pad token and
    masked out. The last batch may hold fewer than batch_size rows.
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 2 - (name == "batch_size"):
            raise ValueError(
                f"{name} must be an int >= {2 - (name == 'batch_size')}, got {value!r}"
            )
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer must have a pad token, got pad_token_id=None")
    rows = _windows(_tokenized(tokenizer, domain, split), seq_len)
    random.Random(seed).shuffle(rows)
    n = math.ceil(len(rows) / batch_size)
    if max_batches is not None:
        n = min(n, max_batches)
    for b in range(n):
        chunk = rows[b * batch_size : (b + 1) * batch_size]
        ids = torch.full((len(chunk), seq_len), tokenizer.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(chunk), seq_len), dtype=torch.int64)
        for i, row in enumerate(chunk):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        yield {"input_ids": ids, "attention_mask": mask}


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (fp32) over the unpadded targets of a batch, and their count."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target_mask = mask[:, 1:].bool() & mask[:, :-1].bool()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    return (nll * target_mask.reshape(-1)).sum(), int(target_mask.sum())


@torch.no_grad()
def eval_perplexity(model, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """exp(token-weighted mean next-token NLL), padding excluded."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        nll, n = token_nll(model, batch)
        total += float(nll)
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("batches must contain at least one unpadded target token, got none")
    return math.exp(total / count)
