"""Markdown tables of `run_eval` results, and optional PNG plots (matplotlib, extra `plot`)."""

from pathlib import Path

from fastdume._atomic import atomic_file


def _row(cells):
    return "| " + " | ".join(cells) + " |"


def _table(header, rows):
    return "\n".join([_row(header), _row(["---"] * len(header)), *map(_row, rows)])


def cross_table(results):
    domains = results["domains"]
    rows = [[f"dense: {e}", *(f"{results['cross'][e][d]:.2f}" for d in domains)] for e in domains]
    return _table(["expert \\ test domain", *domains], rows)


def methods_table(results):
    domains = results["domains"]
    header = ["method", *(f"{d} ppl" for d in domains), "mean ret.", "worst ret.", "tok/s"]
    rows = [["dense expert (own domain)", *(f"{results['dense_own'][d]:.2f}" for d in domains),
             "100.00%", "100.00%", ""]]  # fmt: skip
    for name, m in results["methods"].items():
        r = m["retention"]
        cells = [f"{m['ppl'][d]:.2f} ({r['per_domain'][d]:.1%})" for d in domains]
        label = name + (f" [{m['weighting']}]" if "weighting" in m else "")
        label += f" (alpha={m['alpha']})" if "alpha" in m else ""
        rows.append([label, *cells, f"{r['mean']:.2%}", f"{r['worst']:.2%}",
                     f"{m['tokens_per_s']:,.0f}"])  # fmt: skip
    return _table(header, rows)


def routing_table(results):
    """Mean over domains per router (one per layer; one in all for depth="single")."""
    rows = []
    for name, m in results["methods"].items():
        if m.get("routing"):
            acc = m["routing"]
            layers = len(next(iter(acc.values())))
            means = [sum(acc[d][i] for d in acc) / len(acc) for i in range(layers)]
            rows.append([name, *(f"{v:.1%}" for v in means)])
    if not rows:
        return ""
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    return _table(["routing accuracy", *(f"router {i}" for i in range(width - 1))], rows)


def mixed_table(results):
    """Mixed-domain rows: retention and routing accuracy of each half, mean over pairs."""
    rows = []
    for name, m in results["methods"].items():
        if m.get("mixed"):
            cells = []
            for half in ("first", "second"):
                acc = m["mixed"][half]["routing"]
                cells += [f"{m['mixed'][half]['retention']:.2%}",
                          "" if acc is None else f"{acc:.1%}"]  # fmt: skip
            rows.append([name, f"{m['retention']['mean']:.2%}", *cells])
    if not rows:
        return ""
    header = ["method", "single-domain ret.", "1st half ret.", "1st half routing",
              "2nd half ret.", "2nd half routing"]  # fmt: skip
    return _table(header, rows)


def ablation_table(rows):
    ref = rows[0]["retention"]["mean"]
    out = []
    for row in rows:
        r = row["retention"]
        out.append([row["name"], f"{r['mean']:.2%}", f"{r['worst']:.2%}",
                    f"{(r['mean'] - ref) * 100:+.2f} pt",
                    " ".join(f"{v:.0%}" for v in row["routing_mean"])])  # fmt: skip
    return _table(["variant", "mean ret.", "worst ret.", "vs paper", "routing acc/layer"], out)


def markdown(results):
    parts = ["### Dense experts, test perplexity", cross_table(results), "",
             "### Methods: test perplexity (retention)", methods_table(results), ""]  # fmt: skip
    routing = routing_table(results)
    if routing:
        parts += ["### Routing accuracy (mean over domains)", routing, ""]
    mixed = mixed_table(results)
    if mixed:
        parts += ["### Mixed-domain rows (domain a, then b; mean over ordered pairs)", mixed, ""]
    if results.get("ablations"):
        parts += ["### Ablations (DUME k=1 unless stated)", ablation_table(results["ablations"])]
    return "\n".join(parts)


def plot(results, out_dir):
    """Write retention.png, routing.png, training.png; returns the paths, [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, domains = [], results["domains"]
    fig, ax = plt.subplots(figsize=(9, 4))
    names = list(results["methods"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        per = results["methods"][name]["retention"]["per_domain"]
        ax.bar([j + i * width for j in range(len(domains))], [per[d] for d in domains],
               width, label=name)  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    ax.set_ylabel("retention")
    ax.legend(fontsize=6)
    paths.append(_save(fig, out / "retention.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results["methods"].items():
        if m.get("routing"):
            acc = m["routing"]
            layers = len(next(iter(acc.values())))
            ax.plot(range(layers), [sum(acc[d][i] for d in acc) / len(acc) for i in range(layers)],
                    marker="o", label=name)  # fmt: skip
    ax.set_xlabel("layer")
    ax.set_ylabel("routing accuracy")
    ax.legend(fontsize=6)
    paths.append(_save(fig, out / "routing.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in results["curves"].items():
        ax.plot(losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=6)
    paths.append(_save(fig, out / "training.png"))
    return paths


def _save(fig, path):
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return str(path)
