"""Per-stage orders of forward ("F") and backward ("B") work over M micro-batches.

Both schedules give every stage the same set of micro-batch gradients, so they train
identically; they differ in how many activations a stage holds at once (GPipe: M,
1F1B: at most S - stage)."""

SCHEDULES = ("gpipe", "1f1b")


def gpipe(num_micro_batches, stage, num_stages):
    m = range(num_micro_batches)
    return [("F", i) for i in m] + [("B", i) for i in m]


def one_f_one_b(num_micro_batches, stage, num_stages):
    warmup = min(num_stages - stage - 1, num_micro_batches)
    order = [("F", i) for i in range(warmup)]
    f, b = warmup, 0
    while f < num_micro_batches:
        order += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    order += [("B", i) for i in range(b, num_micro_batches)]
    return order


def schedule(name, num_micro_batches, stage, num_stages):
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if num_micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {num_micro_batches}")
    fn = gpipe if name == "gpipe" else one_f_one_b
    return fn(num_micro_batches, stage, num_stages)
