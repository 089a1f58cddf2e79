"""collect_stats under torch.distributed: 2 gloo ranks on the CPU, each with half the data, give
the statistics of one process over all the data."""

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdume.router import RouterStats, collect_stats


def _model():
    from tiny_models import tiny_dume

    return tiny_dume("llama", domains=("a", "b"), seed=0)


def _batches():
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(4):
        ids = torch.randint(0, 256, (2, 9), generator=g)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 4 + i :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, batches = _model(), _batches()
        shard = batches[rank::world]
        stats = collect_stats(model, "a", shard, progress=False)
        # extending a reduced object adds only the new local shard, not world x the old stats
        stats = collect_stats(model, "b", shard, stats=stats, progress=False)
        bounded = collect_stats(model, "a", shard, max_tokens=20, progress=False)
        plain = RouterStats(1, 3, ["x"])
        plain.update(0, torch.full((2, 3), float(rank + 1)), "x")
        plain.all_reduce()
        if rank == 0:
            stats.save(os.path.join(out_dir, "stats.safetensors"))
            bounded.save(os.path.join(out_dir, "bounded.safetensors"))
            plain.save(os.path.join(out_dir, "plain.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_sum_to_one_pass(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = RouterStats.load(tmp_path / "stats.safetensors")
    model, batches = _model(), _batches()
    one = collect_stats(model, "a", batches, progress=False)
    one = collect_stats(model, "b", batches, stats=one, progress=False)
    assert got.domains == ["a", "b"] and got.fingerprint == one.fingerprint
    for d in ("a", "b"):
        assert got.count(d).tolist() == one.count(d).tolist()
        scale = float(one.gram(d).abs().max())
        assert float((got.gram(d) - one.gram(d)).abs().max()) < 1e-9 * scale
        assert float((got.colsum(d) - one.colsum(d)).abs().max()) < 1e-9 * scale
    bounded = RouterStats.load(tmp_path / "bounded.safetensors")
    assert bounded.count("a").tolist() == [20, 20]  # max_tokens is the total over ranks
    plain = RouterStats.load(tmp_path / "plain.safetensors")
    # rank 0 added 2 rows of 1s, rank 1 two rows of 2s: G = 2*1 + 2*4 = 10, s = 2 + 4 = 6
    assert np.allclose(plain.gram("x")[0].numpy(), 10.0)
    assert np.allclose(plain.colsum("x")[0].numpy(), 6.0)
    assert plain.tokens("x") == 4
