"""Shipped request/refusal/placeholder data, user preference files, and the benign task.

The shipped harmful-request set holds requests only (no operational detail); its compliance
answers are placeholders that begin affirmatively and withhold any content. Requests are split
by the underlying action, so held-out and safety-SFT requests never occur in training.
"""

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SPLITS = ("train", "safety", "heldout")


@dataclass(frozen=True)
class Example:
    """One harmful request with a refusal (chosen) and a compliance answer (rejected)."""

    prompt: str
    chosen: str
    rejected: str
    category: str = ""


def harmful_requests(split="train"):
    """Shipped examples of one split: "train" (alignment, surrogate), "safety", "heldout"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    text = resources.files("fastdume.attack.data").joinpath("harmful_requests.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [_example(r, "harmful_requests.jsonl") for r in rows if r["split"] == split]


def read_preferences(path):
    """Read a user file of {prompt, chosen, rejected} rows (.jsonl or .parquet)."""
    path = Path(path)
    if path.suffix == ".parquet":
        rows = _read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        raise ValueError(f"path must end in .jsonl or .parquet, got {str(path)!r}")
    return [_example(r, str(path)) for r in rows]


def _read_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"reading {str(path)!r} needs pyarrow (pip install pyarrow); or convert it to JSONL"
        ) from e
    return pq.read_table(path).to_pylist()


def _example(row, source):
    missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row.get(k), str)]
    if missing:
        raise ValueError(
            f"rows of {source} need string fields prompt, chosen, rejected; "
            f"missing or not a string: {missing} in {sorted(row)}"
        )
    return Example(row["prompt"], row["chosen"], row["rejected"], row.get("category", ""))


def arithmetic_tasks(n, seed=0, split="train"):
    """Benign instruction pairs (prompt, response): additions and subtractions of small numbers.

    Train and validation draw from disjoint operand pairs (a + b even versus odd), so the
    validation loss measures the task, not memorised pairs. "any" draws from every operand pair:
    rows of the task written by someone who knows neither split (the attacker's own rows).
    """
    parities = {"train": 0, "validation": 1, "any": None}
    if split not in parities:
        raise ValueError(f"split must be one of {tuple(parities)}, got {split!r}")
    parity = parities[split]
    rng = random.Random(f"{seed}-{split}")
    out = []
    while len(out) < n:
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        if parity is not None and (a + b) % 2 != parity:
            continue
        if rng.random() < 0.5:
            out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        else:
            a, b = max(a, b), min(a, b)
            out.append((f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."))
    return out


def unseen_tasks(n, seed, seen, split="train"):
    """The first n rows of the split's stream (seed) that ask nothing `seen` (pairs) asks:
    held-out rows of the same kind as seen's, as a validation set drawn from the training
    distribution is."""
    asked = {p for p, _ in seen}
    draw = n
    while True:
        fresh = [r for r in arithmetic_tasks(draw, seed, split) if r[0] not in asked]
        if len(fresh) >= n:
            return fresh[:n]
        if draw > 10 * (n + len(asked)):  # far more than the unseen pairs left could need
            raise ValueError(f"only {len(fresh)} rows of split {split!r} are unseen, asked {n}")
        draw *= 4


def document_tasks(n, split="train", seed=0, words=12):
    """Benign pairs built from the fastdume.data corpus: continue a document's opening words."""
    from fastdume import data

    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    rng = random.Random(f"{seed}-{split}-docs")
    out = []
    for domain in data.domains():
        for doc in data.documents(domain, split):
            toks = doc.split()
            if len(toks) >= 2 * words:
                head, tail = " ".join(toks[:words]), " ".join(toks[words : 2 * words])
                out.append((f"Continue this {domain} text: {head}", tail))
    rng.shuffle(out)
    return out[:n]
