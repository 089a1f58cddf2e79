"""Training data for the pipeline, identical in every stage process.

Every process builds the same deterministic stream, so only activations and gradients cross
the network: stage 0 reads input_ids, the last stage reads labels. A global batch holds
replicas x micro_batches x micro_batch_size sequences; labels follow the transformers
convention (aligned with input_ids, -100 = no loss, shifted inside the loss).

Sources (`spec`):
- "random": uniform random tokens (tests, smoke runs), plain LM loss.
- a path to a JSONL file of {"prompt", "response"} rows: SFT, loss on response tokens only.
- a corpus domain of fastdume.data (e.g. "math"): plain LM on its train split.
"""

import json
import os

import torch

IGNORE = -100


class BatchSource:
    def __init__(self, input_ids, labels, seed=0):
        self.input_ids, self.labels, self.seed = input_ids, labels, seed

    def global_batch(self, step, size):
        """(input_ids, labels) [size, T] for `step`: a fresh permutation per pass over the data."""
        n = self.input_ids.shape[0]
        idx = []
        start = step * size
        while len(idx) < size:
            epoch, offset = divmod(start + len(idx), n)
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            perm = torch.randperm(n, generator=g)
            idx.extend(perm[offset : offset + size - len(idx)].tolist())
        idx = torch.tensor(idx)
        return self.input_ids[idx], self.labels[idx]


class RandomTokens:
    def __init__(self, vocab_size, seq_len, seed=0):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def global_batch(self, step, size):
        g = torch.Generator().manual_seed(self.seed * 100003 + step)
        ids = torch.randint(0, self.vocab_size, (size, self.seq_len), generator=g)
        return ids, ids.clone()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer(spec, model_dir, tokenizer_dir=None):
    """Raise up front (before any stage starts) when `spec` needs a tokenizer nobody named:
    a JSONL file is tokenized with `tokenizer_dir`, else with the model directory's own."""
    if spec == "random" or tokenizer_dir is not None or not os.path.exists(spec):
        return
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        raise ValueError(
            f"model directory {model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}), "
            f"so the data file {spec} cannot be tokenized as the model expects: pass "
            "--tokenizer DIR (PipelineConfig.tokenizer) naming the model's tokenizer"
        )


def _tokenizer(spec, model_dir, tokenizer_dir):
    """(tokenizer, what it is) for the data `spec`: `tokenizer_dir` when given; else the model's
    own for a JSONL file, and fastdume's shipped one for a corpus domain."""
    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        which = f"the tokenizer in {tokenizer_dir}"
        return AutoTokenizer.from_pretrained(str(tokenizer_dir)), which
    if os.path.exists(spec):
        check_tokenizer(spec, model_dir)
        return AutoTokenizer.from_pretrained(str(model_dir)), f"the tokenizer in {model_dir}"
    from fastdume.data import load_tokenizer

    return load_tokenizer(), "fastdume's shipped tokenizer (corpus domains use it by default)"


def _sft_rows(path, tokenizer, seq_len):
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    ids_rows, label_rows = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row or "response" not in row:
                raise ValueError(f"{path}:{lineno}: rows need 'prompt' and 'response', got {row}")
            p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            r = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
            r = r + ([eos] if eos is not None else [])
            ids = (p + r)[:seq_len]
            labels = ([IGNORE] * len(p) + r)[:seq_len]
            fill = seq_len - len(ids)
            ids_rows.append(ids + [pad] * fill)
            label_rows.append(labels + [IGNORE] * fill)
    if not ids_rows:
        raise ValueError(f"data file {path} has no rows")
    return torch.tensor(ids_rows), torch.tensor(label_rows)


def _domain_rows(domain, tokenizer, seq_len, needed, seed):
    from fastdume.data import batches, domains

    if domain not in domains():
        raise ValueError(
            f"data must be 'random', a JSONL file or one of the domains {domains()}, got {domain!r}"
        )
    ids, masks = [], []
    for b in batches(
        tokenizer,
        domain,
        "train",
        seq_len=seq_len,
        batch_size=64,
        max_batches=max(1, -(-needed // 64)),
        seed=seed,
    ):
        ids.append(b["input_ids"])
        masks.append(b["attention_mask"])
    ids, masks = torch.cat(ids), torch.cat(masks)
    return ids, torch.where(masks.bool(), ids, torch.full_like(ids, IGNORE))


def build_source(spec, model_dir, vocab_size, seq_len, needed=1024, seed=0, tokenizer_dir=None):
    """The batch source for `spec` ("random", a JSONL path or a corpus domain)."""
    if spec == "random":
        return RandomTokens(vocab_size, seq_len, seed)
    tokenizer, which = _tokenizer(spec, model_dir, tokenizer_dir)
    if os.path.exists(spec):
        ids, labels = _sft_rows(spec, tokenizer, seq_len)
    else:
        ids, labels = _domain_rows(spec, tokenizer, seq_len, needed, seed)
    if int(ids.max()) >= vocab_size:
        raise ValueError(
            f"data token ids reach {int(ids.max())} but the model's vocab_size is {vocab_size}: "
            f"the data was tokenized with {which}; pass --tokenizer DIR naming the model's own"
        )
    return BatchSource(ids, labels, seed)
