"""Mean retention of routed="model" for every features x depth option on a zoo, beside paper
DUME, uniform averaging and task arithmetic on the same test batches (docs/EVAL.md, "Routing
the whole model"). Not a pytest bench: a script.

    python benches/eval_routed.py --preset demo --stats-tokens 20000 --eval-batches 3 \
        --batch-size 8 --json routed.json
"""

import argparse
import json
import time

import torch

import fastdume
from fastdume.data import batches, load_tokenizer
from fastdume.data.zoo import build_zoo
from fastdume.eval import baselines
from fastdume.eval.metrics import evaluate, mean_nll, retention

FEATURES = ("token", "context")
DEPTHS = ("layer", "cumulative", "single")
ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def dume(zoo, batches_of, stats_tokens, **options):
    model = fastdume.upcycle(
        [zoo.experts[d] for d in zoo.domains], domains=zoo.domains, progress=False, **options
    ).eval()
    stats = None
    for d in zoo.domains:
        stats = fastdume.collect_stats(
            model, d, batches_of(d, "train"), max_tokens=stats_tokens, stats=stats, progress=False
        )
    return fastdume.fit_router(model, stats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-tokens", type=int, default=20_000)
    p.add_argument("--eval-batches", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--extra-features", default="", help="comma-separated, e.g. context:64")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    zoo = build_zoo(args.preset)
    tokenizer, seq_len = load_tokenizer(), zoo.config["seq_len"]

    def batches_of(domain, split):
        cap = None if split == "train" else args.eval_batches
        return batches(tokenizer, domain, split, seq_len, args.batch_size, cap, seed=args.seed)

    dense_own = {
        d: evaluate(baselines.load_dense(zoo.experts[d]), batches_of, [d])["ppl"][d]
        for d in zoo.domains
    }
    rows = {}

    def record(name, model, **notes):
        start = time.perf_counter()
        res = evaluate(model, batches_of, zoo.domains)
        rows[name] = {"ppl": res["ppl"], "retention": retention(dense_own, res["ppl"]), **notes}
        r = rows[name]["retention"]
        per = ", ".join(f"{d} {v:.1%}" for d, v in r["per_domain"].items())
        print(f"{name}: mean {r['mean']:.2%} worst {r['worst']:.2%} ({per}) "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)  # fmt: skip

    paths = [zoo.experts[d] for d in zoo.domains]
    if not args.no_baselines:
        record("uniform averaging", baselines.uniform_average(paths))
        scores = {}
        for a in ALPHAS:
            model = baselines.task_arithmetic(zoo.base, paths, a)
            scores[a] = mean_nll(evaluate(model, batches_of, zoo.domains, "validation")["ppl"])
        best = min(scores, key=scores.get)
        record("task arithmetic", baselines.task_arithmetic(zoo.base, paths, best), alpha=best)
        record("paper DUME (mlp, token, layer)", dume(zoo, batches_of, args.stats_tokens))
    features = [*FEATURES, *filter(None, args.extra_features.split(","))]
    for f in features:
        for depth in DEPTHS:
            model = dume(
                zoo, batches_of, args.stats_tokens, routed="model", features=f, depth=depth
            )
            record(f"routed=model, {f}, {depth}", model)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "dense_own": dense_own, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
