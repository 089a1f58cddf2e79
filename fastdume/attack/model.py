"""The demo's tiny chat model and its tokenizer."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def demo_tokenizer(texts=()):
    """The shipped fastdume tokenizer; a small byte-level BPE trained on `texts` without it."""
    try:
        from fastdume.data import load_tokenizer
    except ImportError:
        return train_bpe(texts)
    tok = load_tokenizer()
    if tok.eos_token_id is None:
        raise ValueError("the shipped tokenizer must define an eos token, got none")
    return tok


def train_bpe(texts, vocab_size=1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not texts:
        raise ValueError("texts must be non-empty to train a fallback tokenizer, got none")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def tiny_chat_model(vocab_size, hidden=64, layers=8, seed=0):
    """A random-init Llama-style model small enough to align and attack on a CPU in minutes."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()
