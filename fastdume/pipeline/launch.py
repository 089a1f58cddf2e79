"""Start every stage process on one machine (multiprocessing spawn, gloo on loopback), or run
this process's rank under torchrun, and collect the results.

A failing rank writes its error to <out>/ranks/rank<k>.json and exits; its neighbours then
fail fast (closed connection) or at the latest after `timeout` seconds (gloo), and the launcher
kills whatever is still running after that, so a dead stage never leaves the job hanging.
"""

import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from fastdume._atomic import write_json
from fastdume.pipeline.runtime import PipelineConfig, config_dict, init_and_run


class PipelineError(RuntimeError):
    """A stage process failed; the message names every failing stage and why."""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_file(out, rank):
    return Path(out) / "ranks" / f"rank{rank}.json"


def _who(cfg, rank):
    stage, replica = divmod(rank, cfg.replicas)
    return f"stage {stage} replica {replica} (rank {rank})"


def rank_main(cfg, rank, world):
    """Run one rank, record its result or its error; returns the process exit code."""
    path = _rank_file(cfg.out, rank)
    try:
        result = init_and_run(cfg, rank, world)
        write_json(path, {"ok": True, **result}, default=str)
        return 0
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        error = f"{_who(cfg, rank)}: {type(exc).__name__}: {exc}"
        failure = {"ok": False, "rank": rank, "error": error, "traceback": traceback.format_exc()}
        write_json(path, failure, default=str)
        return 1


def _spawn_entry(cfg, rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    import torch

    torch.set_num_threads(cfg.threads)
    code = rank_main(cfg, rank, world)
    os._exit(code)  # skip interpreter teardown: gloo threads of a dead peer must not block it


_PRELOAD = [
    "torch",
    "transformers",
    "fastdume.pipeline.runtime",
    "transformers.models.llama.modeling_llama",
    "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen3.modeling_qwen3",
]


def _mp_context():
    # A fork server that has already imported torch and transformers starts stage processes in
    # a fraction of a second instead of re-importing everything per process (and it is reused
    # by later launches from the same parent). Elsewhere: plain spawn.
    if sys.platform.startswith("linux"):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def _clear(cfg, world):
    for r in range(world):
        _rank_file(cfg.out, r).unlink(missing_ok=True)


def _read_results(cfg, world):
    results = {}
    for r in range(world):
        p = _rank_file(cfg.out, r)
        results[r] = json.loads(p.read_text()) if p.exists() else None
    return results


def _describe(cfg, procs, results, killed=()):
    lines = []
    for r, p in enumerate(procs):
        res = results.get(r)
        if res is not None and not res.get("ok"):
            lines.append(res["error"])
        elif r in killed:
            lines.append(f"{_who(cfg, r)}: did not exit in time and was killed")
        elif p.exitcode not in (0, None) and res is None:
            how = f"killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
            lines.append(f"{_who(cfg, r)}: process died ({how}) without a report")
    return lines


def _kill_running(procs):
    """SIGKILL every process still running; returns their ranks."""
    killed = set()
    for r, p in enumerate(procs):
        if p.exitcode is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
                killed.add(r)
            except ProcessLookupError:  # exited in the meantime
                pass
    for p in procs:
        p.join(5)
    return killed


def _monitor(cfg, procs):
    """Wait for every process; after the first failure give the rest timeout + 10 s to exit."""
    first_failure = None
    while True:
        codes = [p.exitcode for p in procs]
        if all(c is not None for c in codes):
            return
        if first_failure is None and any(c not in (None, 0) for c in codes):
            first_failure = time.monotonic()
        if first_failure is not None and time.monotonic() - first_failure > cfg.timeout + 10:
            return
        time.sleep(0.05)


def launch(cfg: PipelineConfig):
    """Run the whole pipeline on this machine; returns the summary dict or raises
    PipelineError naming the failed stages within about `cfg.timeout` seconds of a failure."""
    cfg.check()
    world = cfg.stages * cfg.replicas
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    _clear(cfg, world)
    port = _free_port()
    ctx = _mp_context()
    procs = [ctx.Process(target=_spawn_entry, args=(cfg, r, world, port)) for r in range(world)]
    for p in procs:
        p.start()
    killed = set()
    try:
        _monitor(cfg, procs)
    finally:  # also on Ctrl-C in the launcher: never leave stage processes behind
        killed = _kill_running(procs)
    results = _read_results(cfg, world)
    failed = _describe(cfg, procs, results, killed)
    if failed:
        raise PipelineError("pipeline training failed:\n  " + "\n  ".join(failed))
    return summarize(cfg, results)


def summarize(cfg, results):
    last = results[(cfg.stages - 1) * cfg.replicas]
    losses = {int(k): v for k, v in last["losses"].items()}
    per_rank = {
        r: {
            k: res[k]
            for k in (
                "stage",
                "replica",
                "layer_range",
                "seconds",
                "bytes_sent",
                "metrics",
                "start_step",
            )
        }
        for r, res in results.items()
    }
    tokens = (cfg.steps - last["start_step"]) * cfg.replicas * cfg.micro_batches
    tokens *= cfg.micro_batch_size * cfg.seq_len
    seconds = max(res["seconds"] for res in results.values())
    return {
        "config": config_dict(cfg),
        "losses": [losses[k] for k in sorted(losses)],
        "steps_run": sorted(losses),
        "grad_norms": [
            v for _, v in sorted((int(k), v) for k, v in results[0]["grad_norms"].items())
        ],
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "bytes_sent": sum(res["bytes_sent"] for res in results.values()),
        "model_dir": results[0]["model_dir"],
        "ranks": per_rank,
    }


def torchrun_main(cfg: PipelineConfig):
    """Entry under torchrun: this process is rank $RANK of $WORLD_SIZE (env:// rendezvous)."""
    cfg.check()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    code = rank_main(cfg, rank, world)
    result = json.loads(_rank_file(cfg.out, rank).read_text())
    if code != 0:
        raise PipelineError(result["error"])
    return result
