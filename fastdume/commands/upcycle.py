"""`fastdume upcycle`: dense expert directories in, one DUME model directory out."""

import shutil
import sys
import time
from pathlib import Path

from fastdume._atomic import write_json

DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "upcycle",
        help="merge dense domain experts into one DUME mixture-of-experts model",
        description="Merge dense experts fine-tuned from one base (Llama, Mistral, Qwen2 or Qwen3; "
        "HF directories with safetensors weights) into one DUME model: every layer's MLP becomes "
        "one expert, all other weights are averaged (or taken from --shared base:DIR); with "
        "--routed model every tensor stays per expert. The routers start at zero; fit them with "
        "`fastdume stats` and `fastdume fit`.",
        epilog="example: fastdume upcycle experts/math experts/code experts/law --out dume/",
    )
    parser.add_argument("experts", nargs="+", help="dense expert model directories, one per domain")
    parser.add_argument(
        "--out", required=True, help="output directory (must not exist or be empty)"
    )
    parser.add_argument(
        "--domains",
        help="comma-separated domain names in expert order (default: the directory names)",
    )
    parser.add_argument(
        "--shared",
        default="mean",
        help="'mean' (average the experts' non-MLP weights, the paper) or 'base:DIR' (take them "
        "from the common base model, so statistics stay exact when experts are added later)",
    )
    parser.add_argument(
        "--routed",
        choices=("mlp", "model"),
        default="mlp",
        help="'mlp' (the paper: MLPs are experts, the rest shared) or 'model' (every tensor kept "
        "per expert; each token runs its expert's whole network; needs --top-k 1)",
    )
    parser.add_argument(
        "--features",
        help="router features: 'token', 'context' (causal running mean over the sequence), "
        "'context:H' (decayed, half-life H tokens), 'vocab' / 'vocab:H' (naive Bayes on the "
        "tokens so far; needs --depth single); default: the measured best for --routed",
    )
    parser.add_argument(
        "--depth",
        help="'layer' (a router per layer), 'cumulative' (logits summed over the layers so far) "
        "or 'single' (one router at the embeddings decides every layer); default: the measured "
        "best for --routed",
    )
    parser.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: the experts')")
    parser.add_argument("--top-k", type=int, default=1, help="experts per token (default 1)")
    parser.add_argument("--temperature", type=float, default=1.0, help="router temperature")
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON here")
    parser.set_defaults(run=run)
    return parser


def _copy_tokenizer(experts, directory):
    for expert in experts:
        files = [Path(expert) / f for f in TOKENIZER_FILES if (Path(expert) / f).is_file()]
        if files:
            for file in files:
                shutil.copy2(file, directory / file.name)
            return str(expert)
    return None


def _summary(model, out, tokenizer_from, seconds):
    config = model.config
    dense = model.model.config
    from fastdume.models.modeling import DumeExperts
    from fastdume.models.routed import routed_modules

    per_expert = [m for m in model.modules() if isinstance(m, DumeExperts)]
    per_expert += routed_modules(model)
    expert_params = sum(p.numel() for m in per_expert for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    active = total - expert_params + expert_params * config.top_k // config.num_experts
    return {
        "out": str(out),
        "family": config.dense_family,
        "domains": list(config.domains),
        "num_experts": config.num_experts,
        "num_layers": dense.num_hidden_layers,
        "hidden_size": dense.hidden_size,
        "intermediate_size": dense.intermediate_size,
        "top_k": config.top_k,
        "router_temperature": config.router_temperature,
        "shared": config.shared,
        "routed": config.routed,
        "router_features": config.router_features,
        "router_depth": config.router_depth,
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": total,
        "active_parameters_per_token": active,
        "tokenizer_from": tokenizer_from,
        "seconds": round(seconds, 3),
    }


def _print_summary(s):
    shared = {"mean": "mean of the experts", "none": "nothing (every tensor per expert)"}.get(
        s["shared"], s["shared"].removeprefix("base:")
    )
    print(f"upcycled {s['num_experts']} {s['family']} experts -> {s['out']}")
    print(f"  domains:     {', '.join(s['domains'])}")
    print(
        f"  shape:       {s['num_layers']} layers, hidden {s['hidden_size']}, "
        f"expert intermediate {s['intermediate_size']}, {s['dtype']}"
    )
    print(f"  shared:      {shared}")
    print(
        f"  routing:     routed={s['routed']}, features={s['router_features']}, "
        f"depth={s['router_depth']}"
    )
    print(
        f"  parameters:  {s['parameters'] / 1e6:.2f}M total, "
        f"{s['active_parameters_per_token'] / 1e6:.2f}M active per token (top-{s['top_k']})"
    )
    print(f"  tokenizer:   {s['tokenizer_from'] or 'none found in the expert directories'}")
    print("  routers:     zero until fitted (`fastdume stats`, then `fastdume fit`)")
    print(f"  took {s['seconds']:.1f} s")


def run(args):
    import torch

    from fastdume._atomic import atomic_directory, check_writable_directory
    from fastdume.merge.upcycle import upcycle

    start = time.perf_counter()
    domains = None if args.domains is None else [d.strip() for d in args.domains.split(",")]
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    try:
        check_writable_directory(args.out)  # before the work, not after it
        model = upcycle(
            args.experts,
            domains=domains,
            shared=args.shared,
            dtype=dtype,
            routed=args.routed,
            features=args.features,
            depth=args.depth,
            top_k=args.top_k,
            temperature=args.temperature,
        )
        with atomic_directory(args.out) as tmp:
            model.save_pretrained(tmp)
            tokenizer_from = _copy_tokenizer(args.experts, tmp)
    except (ValueError, FileExistsError) as err:
        print(f"fastdume upcycle: error: {err}", file=sys.stderr)
        return 2
    summary = _summary(model, args.out, tokenizer_from, time.perf_counter() - start)
    _print_summary(summary)
    if args.json:
        write_json(args.json, summary)
    return 0
