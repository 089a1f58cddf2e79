"""Offline multi-domain corpus, shipped tokenizer, batches, perplexity; the model zoo in .zoo."""

from __future__ import annotations

from pathlib import Path

from fastdume.data.batching import batches, eval_perplexity, token_nll
from fastdume.data.corpus import SPLITS, documents, domains

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"

__all__ = [
    "SPLITS", "TOKENIZER_DIR", "batches", "documents", "domains", "eval_perplexity",
    "load_tokenizer", "token_nll",
]  # fmt: skip


def load_tokenizer():
    """The shipped 4096-token byte-level BPE: a fast tokenizer with pad/bos/eos, chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))
