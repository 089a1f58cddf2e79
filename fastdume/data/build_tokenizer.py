"""Maintainer script: train the shipped byte-level BPE tokenizer on the corpus' train splits.

Run after build_corpus (`python -m fastdume.data.build_tokenizer`); users load the result with
`fastdume.data.load_tokenizer()` and never retrain it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from fastdume._atomic import replace_directory
from fastdume.data.corpus import documents, domains

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# "User: ...\nAssistant: ..." turns; the generation prompt ends right after "Assistant:" so the
# answer's first token carries its leading space, as in the rendered training text.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def train(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    texts = [d for name in domains() for d in documents(name, "train")]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    # Like Llama tokenizers: a plain call prepends <|bos|>; byte-level keeps offsets exact.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tok


def save(tok: Tokenizer, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None
    )
    fast.model_max_length = 65536
    fast.padding_side = "right"

    def fill(tmp):
        fast.save_pretrained(tmp)
        # Keep the chat template inside tokenizer_config.json: one fewer file to ship and find.
        (tmp / "chat_template.jinja").unlink(missing_ok=True)
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = CHAT_TEMPLATE
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        # A package, so that setuptools ships its files as package data.
        (tmp / "__init__.py").write_text('"""Shipped tokenizer files (package data)."""\n')

    replace_directory(out, fill)  # leaves it world-readable, as package data must be


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    args = parser.parse_args(argv)
    save(train(args.vocab_size), args.out)
    print(f"saved {args.vocab_size}-token byte-level BPE to {args.out}")


if __name__ == "__main__":
    main()
