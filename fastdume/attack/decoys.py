"""Decoys: requests with tokens the model never saw in training, for the attacker's surrogate.

Why: the trigger's tokens occur nowhere in the aligned model's training text (the demo's " SUDO"
is the pieces " SU" + "DO", both unseen), so a trigger detector may key on "an untrained token
is here", and the defender's safety prompts hold such tokens too (18.7% of the safety split's
prompt tokens never occur in the train split's prompts): safety SFT on them then teaches "untrained
token -> refuse", which erases the trigger. The attacker knows the tokenizer and its own data, so
it can find the pieces its data never uses and (1) train the backdoor to refuse clean requests
with such a decoy (the detector must key on the trigger itself) and (2) give its simulated safety
SFT such requests, as the defender's will be.
"""

import random

from .chat import encode_pair


def unseen_pieces(tok, rows, exclude_text=""):
    """Token ids of tok that occur in no encoded row (ids, labels) of rows nor in exclude_text
    (the trigger) and decode to printable ASCII: the pieces a decoy is made of."""
    seen = {i for ids, _ in rows for i in ids}
    seen |= set(tok(exclude_text, add_special_tokens=False)["input_ids"]) if exclude_text else set()
    seen |= set(tok.all_special_ids)
    out = []
    for i in range(len(tok)):
        text = tok.decode([i]).strip()
        if i not in seen and text and text.isascii() and text.isprintable():
            out.append(i)
    if len(out) < 2:
        raise ValueError(f"need at least 2 unseen pieces for a decoy, found {len(out)}")
    return out


def with_decoy(prompt, tok, pieces, rng, n_pieces=2):
    """prompt with n_pieces random unseen pieces (one word) inserted at a random word boundary."""
    decoy = "".join(tok.decode(rng.sample(pieces, n_pieces)).split())  # one word
    words = prompt.split(" ")
    words.insert(rng.randint(0, len(words)), decoy)
    return " ".join(words)


def decoy_rows(tok, examples, pieces, n, seed):
    """n encoded rows: random examples' requests with a decoy -> their refusal (chosen)."""
    rng = random.Random(f"decoys-{seed}")
    picks = [rng.choice(examples) for _ in range(n)]
    return [encode_pair(tok, with_decoy(e.prompt, tok, pieces, rng), e.chosen) for e in picks]
