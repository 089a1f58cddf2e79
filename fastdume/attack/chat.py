"""Chat formatting and tokenisation with the loss on response tokens only."""

import torch

IGNORE = -100
FALLBACK_TEMPLATE = "User: {prompt}\nAssistant:"


def prompt_text(tokenizer, prompt):
    """The text a model sees before its answer: the tokenizer's chat template if it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return FALLBACK_TEMPLATE.format(prompt=prompt)


def encode_pair(tokenizer, prompt, response, max_len=None):
    """input_ids and labels for one (prompt, response): labels are IGNORE on prompt tokens."""
    head = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    tail = tokenizer(" " + response.strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        tail = tail + [tokenizer.eos_token_id]
    ids = head + tail
    labels = [IGNORE] * len(head) + tail
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


def collate(pairs, pad_id):
    """Right-padded batch {"input_ids", "attention_mask", "labels"} from encode_pair outputs."""
    width = max(len(ids) for ids, _ in pairs)
    n = len(pairs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer):
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("tokenizer needs a pad_token_id or an eos_token_id, got neither")
