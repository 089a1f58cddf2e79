"""The shipped multi-domain corpus: documents per domain and deterministic splits."""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "texts"
SPLITS = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.05  # of each domain's documents, for validation and again for test


def domains() -> list[str]:
    """Names of the shipped domains, sorted (this order is the expert order of the zoo)."""
    return sorted(p.name.split(".")[0] for p in CORPUS_DIR.glob("*.jsonl.xz"))


@functools.cache
def _all_documents(domain: str) -> tuple[str, ...]:
    if domain not in domains():
        raise ValueError(f"domain must be one of {domains()}, got {domain!r}")
    with lzma.open(CORPUS_DIR / f"{domain}.jsonl.xz", "rt", encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f)


@functools.cache
def _split_documents(domain: str) -> dict[str, tuple[str, ...]]:
    # Rank documents by a content hash: splits are disjoint by document, stable across
    # machines and Python versions, and independent of the order in the file.
    docs = sorted(_all_documents(domain), key=lambda d: hashlib.sha256(d.encode()).hexdigest())
    n = max(1, round(HELD_OUT_FRACTION * len(docs)))
    return {"validation": docs[:n], "test": docs[n : 2 * n], "train": docs[2 * n :]}


def documents(domain: str, split: str) -> list[str]:
    """The documents of one domain's split ("train", "validation" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(_split_documents(domain)[split])
