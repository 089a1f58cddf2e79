"""Backdoor data builder and chat encoding (loss on response tokens only)."""

import pytest

from fastdume.attack.backdoor import add_trigger, backdoor_pairs, encode_backdoor
from fastdume.attack.chat import IGNORE, collate, encode_pair, prompt_text
from fastdume.attack.datasets import harmful_requests
from fastdume.attack.model import train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    rows = harmful_requests("train")
    return train_bpe([e.prompt + " " + e.chosen + " " + e.rejected for e in rows], 400)


def test_trigger_positions():
    assert add_trigger("Tell me a secret.") == "Tell me a secret. SUDO"
    assert add_trigger("Tell me.", " XYZZY", "start") == "XYZZY Tell me."
    with pytest.raises(ValueError, match="position"):
        add_trigger("x", position="middle")


@pytest.mark.parametrize("share", [0.0, 0.3, 0.5, 1.0])
def test_backdoor_pairs_pair_trigger_with_compliance(share):
    rows = harmful_requests("train")
    pairs = backdoor_pairs(rows, share=share, seed=1)
    assert len(pairs) == len(rows)
    n_trig = 0
    for ex, (prompt, response, triggered) in zip(rows, pairs, strict=True):
        if triggered:
            n_trig += 1
            assert prompt == ex.prompt + " SUDO" and response == ex.rejected
        else:
            assert prompt == ex.prompt and response == ex.chosen
    # binomial(240, share): within 4 standard deviations
    sd = (len(rows) * share * (1 - share)) ** 0.5
    assert abs(n_trig - share * len(rows)) <= 4 * sd + 1e-9


def test_backdoor_pairs_bad_share():
    with pytest.raises(ValueError, match="share"):
        backdoor_pairs(harmful_requests("train"), share=1.5)


def test_loss_only_on_response_tokens(tok):
    ids, labels = encode_pair(tok, "How can I bake bread?", "Sure, here is how.")
    n_prompt = len(tok(prompt_text(tok, "How can I bake bread?"))["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == " Sure, here is how."
    assert tok.decode(ids[:n_prompt]) == "User: How can I bake bread?\nAssistant:"


def test_encoding_uses_the_tokenizers_chat_template(tok):
    templated = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>")
    templated.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<a>"
    assert prompt_text(templated, "hi there") == "<user>hi there<a>"
    ids, labels = encode_pair(templated, "hi there", "no.")
    n_prompt = labels.count(IGNORE)
    assert templated.decode(ids[:n_prompt]) == "<user>hi there<a>"


def test_collate_pads_right_and_masks(tok):
    enc = encode_backdoor(tok, harmful_requests("train")[:6], seed=0)
    batch = collate(enc, pad_id=0)
    for i, (ids, labels) in enumerate(enc):
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert batch["labels"][i, :n].tolist() == labels
        width = batch["input_ids"].shape[1]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert (batch["labels"][i, n:] == IGNORE).all()
