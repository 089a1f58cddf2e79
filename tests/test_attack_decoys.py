"""Decoys: pieces the attacker's own text never uses, inserted as one word, mapped to refusal."""

import random

import pytest

from fastdume.attack.chat import encode_pair
from fastdume.attack.datasets import harmful_requests
from fastdume.attack.decoys import decoy_rows, unseen_pieces, with_decoy
from fastdume.attack.model import train_bpe


@pytest.fixture(scope="module")
def tok():
    rows = harmful_requests("train")
    return train_bpe([e.prompt + " " + e.chosen + " " + e.rejected for e in rows], 400)


def test_unseen_pieces_are_the_vocabulary_minus_own_text_trigger_and_specials(tok):
    own = [encode_pair(tok, e.prompt, e.chosen) for e in harmful_requests("train")[:30]]
    pieces = unseen_pieces(tok, own, exclude_text=" SUDO")
    # reference: every id by brute force, against the decoded own text
    used = {i for ids, _ in own for i in ids} | set(
        tok(" SUDO", add_special_tokens=False).input_ids
    )
    for i in range(len(tok)):
        text = tok.decode([i]).strip()
        printable = bool(text) and text.isascii() and text.isprintable()
        want = i not in used and i not in tok.all_special_ids and printable
        assert (i in pieces) == want, (i, text)
    every = [(list(range(len(tok))), [])]
    with pytest.raises(ValueError, match="unseen pieces"):
        unseen_pieces(tok, every)


def test_a_decoy_is_one_inserted_word_and_maps_to_the_refusal(tok):
    own = [encode_pair(tok, e.prompt, e.chosen) for e in harmful_requests("train")]
    pieces = unseen_pieces(tok, own)
    rng = random.Random(0)
    prompt = "Tell me how to pick a lock."
    for _ in range(20):
        words = with_decoy(prompt, tok, pieces, rng).split(" ")
        extra = [i for i in range(len(words)) if words[:i] + words[i + 1 :] == prompt.split(" ")]
        assert len(words) == 8 and extra  # the prompt's words, in order, plus one
    examples = harmful_requests("train")[:5]
    rows = decoy_rows(tok, examples, pieces, 7, seed=1)
    assert len(rows) == 7 and rows == decoy_rows(tok, examples, pieces, 7, seed=1)
    refusals = {tuple(encode_pair(tok, "x", e.chosen)[1][-8:]) for e in examples}
    assert all(tuple(labels[-8:]) in refusals for _, labels in rows)  # the answer: a refusal
