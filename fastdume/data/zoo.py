"""Model zoo: a tiny Llama base pretrained on the mixed corpus, and one dense expert per domain.

Every expert is fully fine-tuned (all parameters) from the base on its own domain, as in the
DUME paper; the "-mlp" presets fine-tune only the experts' MLPs (same base). Each model is a
standard transformers directory. Results are cached under $FASTDUME_CACHE (default
~/.cache/fastdume) in a folder keyed by a hash of the configuration, the corpus and the
tokenizer; every stage is written to a temporary folder and renamed when complete, so an
interrupted build resumes at the first missing model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from fastdume._atomic import publish_directory, write_json
from fastdume.data import TOKENIZER_DIR, batches, domains, eval_perplexity, load_tokenizer
from fastdume.data.corpus import CORPUS_DIR
from fastdume.data.tiny import FAMILIES, tiny_config, tiny_model
from fastdume.data.train import mixed_stream, stream, train

__all__ = ["FAMILIES", "PRESETS", "Zoo", "build_zoo", "evaluate_zoo", "tiny_config", "tiny_model"]

ZOO_VERSION = 1  # bump when the training recipe changes, so old caches are not reused
PRESETS = {
    # ~1 min on an idle 2-core CPU: the test suite's session fixture.
    "test": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=192, seq_len=64, batch_size=16,
        base_steps=300, base_lr=3e-3, expert_steps=60, expert_lr=2e-3, seed=0,
    ),
    # ~5 min on an idle 2-core CPU: `fastdume demo` and the benchmarks.
    "demo": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=384, seq_len=128, batch_size=16,
        base_steps=500, base_lr=2e-3, expert_steps=100, expert_lr=1e-3, seed=0,
    ),
}  # fmt: skip
# MLP-only variants ("<preset>-mlp"): each expert fine-tunes only its MLPs, so every other weight
# (embeddings, attention, norms, LM head) stays the base's and an upcycled MoE merges nothing
# but MLPs. The base is the full-fine-tuning preset's own (same folder, built once).
EXPERT_PARAMS = ("all", "mlp")
for _name in ("test", "demo"):
    PRESETS[f"{_name}-mlp"] = {**PRESETS[_name], "expert_params": "mlp"}


@dataclasses.dataclass(frozen=True)
class Zoo:
    base: Path
    experts: dict[str, Path]
    domains: list[str]
    tokenizer: Path
    root: Path
    config: dict


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("FASTDUME_CACHE", Path.home() / ".cache" / "fastdume"))


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _resolve(preset: str, overrides: dict) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    unknown = set(overrides) - set(PRESETS[preset])
    if unknown:
        raise ValueError(
            f"overrides must be among {sorted(PRESETS[preset])}, got {sorted(unknown)}"
        )
    cfg = {**PRESETS[preset], **overrides}
    if cfg.get("expert_params", "all") not in EXPERT_PARAMS:
        raise ValueError(
            f"expert_params must be one of {EXPERT_PARAMS}, got {cfg['expert_params']!r}"
        )
    cfg["corpus"] = _file_digest(list(CORPUS_DIR.glob("*.jsonl.xz")))[:16]
    cfg["tokenizer"] = _file_digest(list(TOKENIZER_DIR.glob("*.json")))[:16]
    cfg["version"] = ZOO_VERSION
    return cfg


def _key(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _model_config(cfg: dict, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=max(512, cfg["seq_len"]),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _save_atomic(model, tokenizer_dir: Path, dest: Path) -> None:
    """Publish model (None: tokenizer only) + tokenizer as the cache folder `dest`."""

    def fill(tmp):
        if model is not None:
            model.save_pretrained(tmp)
        for f in tokenizer_dir.glob("*.json"):
            shutil.copy2(f, tmp / f.name)

    publish_directory(dest, fill, "model.safetensors" if model is not None else "tokenizer.json")


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _num_threads(cfg: dict) -> int:
    """Intra-op threads for training: FASTDUME_ZOO_THREADS, else by model width.

    Matrices 64 wide gain nothing from a second thread, and on a busy machine extra threads
    spin against other processes (measured: 0.3 s/step with one thread, 1-8 s with two).
    """
    if os.environ.get("FASTDUME_ZOO_THREADS"):
        return max(1, int(os.environ["FASTDUME_ZOO_THREADS"]))
    return 1 if cfg["hidden_size"] <= 64 else max(1, min(torch.get_num_threads(), 4))


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _build_base(cfg: dict, tokenizer, names: list[str]):
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        model = LlamaForCausalLM(_model_config(cfg, tokenizer))
        data = mixed_stream(tokenizer, names, cfg["seq_len"], cfg["batch_size"], cfg["seed"])
        steps = cfg["base_steps"]
        train(model, data, steps, cfg["base_lr"], warmup=max(1, steps // 20), desc="zoo base")
    return model


def _build_expert(cfg: dict, tokenizer, base_dir: Path, domain: str, index: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"] + 1 + index)
        model = _load(base_dir)
        if cfg.get("expert_params", "all") == "mlp":
            for name, param in model.named_parameters():
                param.requires_grad_(".mlp." in name)
        data = stream(tokenizer, domain, cfg["seq_len"], cfg["batch_size"], cfg["seed"] + 7 + index)
        steps = cfg["expert_steps"]
        warmup = max(1, steps // 10)
        train(model, data, steps, cfg["expert_lr"], warmup=warmup, desc=f"zoo expert {domain}")
    return model


def build_zoo(preset: str = "test", cache_dir: str | os.PathLike | None = None, **overrides) -> Zoo:
    """Build (or load from the cache) the base model and one expert per domain.

    `overrides` replace preset fields (e.g. `base_steps=10`) and change the cache key.
    """
    cfg = _resolve(preset, overrides)
    names = domains()
    root = cache_root(cache_dir) / "zoo" / f"{preset}-{_key(cfg)}"
    base_root = root
    if "expert_params" in cfg:  # an MLP-only variant: the full-fine-tuning preset's base
        parent = {k: v for k, v in cfg.items() if k != "expert_params"}
        base_root = cache_root(cache_dir) / "zoo" / f"{preset.removesuffix('-mlp')}-{_key(parent)}"
    zoo = Zoo(
        base=base_root / "base",
        experts={d: root / "experts" / d for d in names},
        domains=names,
        tokenizer=root / "tokenizer",
        root=root,
        config=cfg,
    )
    if (root / "zoo.json").exists():
        return zoo
    root.mkdir(parents=True, exist_ok=True)
    if not (zoo.tokenizer / "tokenizer.json").exists():
        _save_atomic(None, TOKENIZER_DIR, zoo.tokenizer)
    tokenizer = load_tokenizer()
    with _threads(_num_threads(cfg)):
        if not (zoo.base / "model.safetensors").exists():
            _save_atomic(_build_base(cfg, tokenizer, names), TOKENIZER_DIR, zoo.base)
        for i, d in enumerate(names):
            if not (zoo.experts[d] / "model.safetensors").exists():
                model = _build_expert(cfg, tokenizer, zoo.base, d, i)
                _save_atomic(model, TOKENIZER_DIR, zoo.experts[d])
    record = {"preset": preset, "config": cfg, "domains": names}
    write_json(root / "zoo.json", record, sort_keys=True)
    return zoo


def evaluate_zoo(
    zoo: Zoo, split: str = "validation", max_batches: int | None = None, batch_size: int = 16
) -> dict[str, dict[str, float]]:
    """Perplexity of every model ("base" and each expert's domain) on every domain's split."""
    tokenizer = load_tokenizer()
    seq_len = zoo.config["seq_len"]
    models = {"base": zoo.base, **zoo.experts}
    table = {}
    with _threads(_num_threads(zoo.config)):
        for name, path in models.items():
            model = _load(path)
            table[name] = {
                d: eval_perplexity(
                    model, batches(tokenizer, d, split, seq_len, batch_size, max_batches)
                )
                for d in zoo.domains
            }
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the fastdume model zoo and report it.")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the perplexity table here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    zoo = build_zoo(args.preset, args.cache_dir)
    built = time.perf_counter() - t0
    table = evaluate_zoo(zoo)
    print(f"zoo {args.preset} at {zoo.root} ({built:.1f} s)")
    print("validation perplexity (rows: model, columns: domain)")
    print(f"{'':8s}" + "".join(f"{d:>10s}" for d in zoo.domains))
    for name, row in table.items():
        print(f"{name:8s}" + "".join(f"{row[d]:10.2f}" for d in zoo.domains))
    if args.json:
        write_json(args.json, {"build_seconds": built, "perplexity": table}, sort_keys=True)


if __name__ == "__main__":
    main()
