"""The shipped corpus, its splits, the tokenizer, batches and the perplexity measure."""

import math
import random
from collections import Counter

import pytest
import torch

import fastdume.data as D
from fastdume.data import corpus
from fastdume.data.tiny import tiny_model


@pytest.fixture(scope="module")
def tok():
    return D.load_tokenizer()


def test_domains_are_the_shipped_four_or_more():
    names = D.domains()
    assert len(names) >= 4 and names == sorted(set(names))
    assert {"code", "legal", "math", "prose"} <= set(names)


@pytest.mark.parametrize("domain", D.domains())
def test_splits_are_disjoint_complete_and_deterministic(domain):
    splits = {s: D.documents(domain, s) for s in D.SPLITS}
    assert all(len(docs) >= 20 for docs in splits.values())
    sets = {s: set(docs) for s, docs in splits.items()}
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["test"])
    assert not (sets["validation"] & sets["test"])
    everything = corpus._all_documents(domain)
    assert sum(len(d) for d in splits.values()) == len(everything) == len(set(everything))
    # Recomputed from scratch (no cache), and from a shuffled file order: the same splits.
    corpus._split_documents.cache_clear()
    corpus._all_documents.cache_clear()
    assert {s: D.documents(domain, s) for s in D.SPLITS} == splits


def test_split_does_not_depend_on_file_order(monkeypatch):
    domain = D.domains()[0]
    before = D.documents(domain, "validation")
    shuffled = list(corpus._all_documents(domain))
    random.Random(1).shuffle(shuffled)
    corpus._split_documents.cache_clear()
    monkeypatch.setattr(corpus, "_all_documents", lambda d: tuple(shuffled))
    assert D.documents(domain, "validation") == before
    corpus._split_documents.cache_clear()


def test_bad_domain_and_split_name_the_argument():
    with pytest.raises(ValueError, match="domain must be one of .*'poetry'"):
        D.documents("poetry", "train")
    with pytest.raises(ValueError, match="split must be one of .*'dev'"):
        D.documents("code", "dev")


def _unigram(tok, domain, split):
    counts = Counter()
    for ids in tok(D.documents(domain, split), add_special_tokens=False)["input_ids"]:
        counts.update(ids)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}


def _js(p, q):
    keys = set(p) | set(q)
    m = {k: 0.5 * (p.get(k, 0) + q.get(k, 0)) for k in keys}

    def kl(a):
        return sum(a[k] * math.log(a[k] / m[k]) for k in a if a[k] > 0)

    return 0.5 * kl(p) + 0.5 * kl(q)


def test_domains_are_clearly_different(tok):
    # Token unigram distributions: each domain's validation text is at least twice as far
    # (Jensen-Shannon) from every other domain's training text as from its own.
    names = D.domains()
    train = {d: _unigram(tok, d, "train") for d in names}
    for a in names:
        val = _unigram(tok, a, "validation")
        own = _js(val, train[a])
        others = [_js(val, train[b]) for b in names if b != a]
        assert min(others) > 0.15 and min(others) > 2 * own, (a, own, others)


def test_tokenizer_is_a_byte_level_bpe_with_special_tokens(tok):
    assert 4096 <= len(tok) <= 8192
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    assert None not in ids and len(ids) == 3
    enc = tok("hello world")["input_ids"]
    assert enc[0] == tok.bos_token_id and tok.eos_token_id not in enc
    # Subwords: common words are single tokens, and text compresses well below a byte/token.
    assert len(tok(" the", add_special_tokens=False)["input_ids"]) == 1
    text = "\n\n".join(D.documents("prose", "validation"))
    assert len(text) / len(tok(text, add_special_tokens=False)["input_ids"]) > 2.5


def test_tokenizer_round_trips_real_and_odd_text(tok):
    r = random.Random(0)
    samples = [r.choice(D.documents(d, s)) for d in D.domains() for s in D.SPLITS]
    samples += ["tabs\tand  spaces \n\n", "unicode: é ü 漢字 🙂 ‘quotes’", "x" * 300]
    for text in samples:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders_user_assistant_turns(tok):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|>User: What is 2+2?\nAssistant:"
    full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": "4"}], tokenize=False)
    assert full == "<|bos|>User: What is 2+2?\nAssistant: 4<|eos|>\n"
    assert tok(full, add_special_tokens=False)["input_ids"][0] == tok.bos_token_id


def _reference_windows(tok, domain, split, seq_len):
    out = []
    for doc in D.documents(domain, split):
        ids = [tok.bos_token_id, *tok.encode(doc, add_special_tokens=False), tok.eos_token_id]
        out += [tuple(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
    return sorted(w for w in out if len(w) > 1)


@pytest.mark.parametrize("seq_len,batch_size", [(64, 8), (97, 5)])
def test_batches_cover_every_window_with_right_padding(tok, seq_len, batch_size):
    rows = []
    got = list(D.batches(tok, "legal", "validation", seq_len=seq_len, batch_size=batch_size))
    for i, b in enumerate(got):
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.dtype == torch.int64 and mask.dtype == torch.int64
        assert ids.shape == mask.shape and ids.shape[1] == seq_len
        assert ids.shape[0] == batch_size or i == len(got) - 1
        lengths = mask.sum(1)
        # Right padding: each mask row is ones then zeros, and padded slots hold the pad id.
        ref_mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
        assert torch.equal(mask, ref_mask)
        assert torch.all(ids[mask == 0] == tok.pad_token_id)
        rows += [tuple(r[:n].tolist()) for r, n in zip(ids, lengths, strict=True)]
    assert any(len(r) < seq_len for r in rows)  # document tails are padded, not packed
    assert sorted(rows) == _reference_windows(tok, "legal", "validation", seq_len)


def test_batches_are_seeded_and_limited(tok):
    def take(seed, n=3):
        return [b["input_ids"] for b in D.batches(tok, "code", "train", 32, 4, n, seed=seed)]

    a, b, c = take(0), take(0), take(1)
    assert len(a) == 3
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_batches_reject_bad_arguments(tok):
    with pytest.raises(ValueError, match="seq_len must be an int >= 2, got 1"):
        next(D.batches(tok, "code", "train", seq_len=1))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        next(D.batches(tok, "code", "train", batch_size=0))


def test_eval_perplexity_matches_transformers_loss(tok):
    model = tiny_model("llama", seed=3, vocab_size=len(tok))
    data = list(D.batches(tok, "math", "validation", seq_len=48, batch_size=4, max_batches=3))
    assert any((b["attention_mask"] == 0).any() for b in data)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in data:
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            out = model(**b, labels=labels)
            total += out.loss.double().item() * n
            count += n
    assert D.eval_perplexity(model, data) == pytest.approx(math.exp(total / count), rel=1e-5)
    with pytest.raises(ValueError, match="at least one unpadded target"):
        D.eval_perplexity(model, [])
