"""DeviceStager copies on a GPU (H100 targets: pinned copies >= 90% of torch's bandwidth, >= 90% of
a transfer hidden behind compute on another stream).

Ratios are measured in the same run and reported in benchmark.extra_info."""

import pytest
import torch
from timing import best_of, cuda_seconds

from fastdume.ops.stager import DeviceStager


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["d2h", "h2d"])
def test_pinned_copy_vs_torch(benchmark, direction):
    nbytes = 256 * 2**20
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    stager = DeviceStager()
    engine, cur = stager.engine, torch.cuda.current_stream().cuda_stream
    to_host = direction == "d2h"
    dst, src = (host, dev) if to_host else (dev, host)

    def ours():
        ev = engine.copy(dst.data_ptr(), src.data_ptr(), nbytes, to_host, cur)
        engine.synchronize(ev)
        engine.reset()

    def theirs():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    t_ours, t_torch = best_of(ours, 5), best_of(theirs, 5)
    benchmark(ours)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        gb_s=nbytes / t_ours / 1e9,
        torch_gb_s=nbytes / t_torch / 1e9,
        fraction_of_torch=t_torch / t_ours,
    )


@pytest.mark.gpu
def test_copy_hidden_behind_compute(benchmark):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    nbytes = 512 * 2**20
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    engine = DeviceStager().engine
    cur = torch.cuda.current_stream().cuda_stream

    def compute():
        for _ in range(20):
            a @ a

    def copy():
        ev = engine.copy(host.data_ptr(), dev.data_ptr(), nbytes, True, cur)
        return ev

    def both():
        ev = copy()  # queued behind nothing new: starts at once on the copy stream
        compute()
        engine.synchronize(ev)
        torch.cuda.synchronize()
        engine.reset()

    t_compute = cuda_seconds(compute)
    t_copy = best_of(lambda: (engine.synchronize(copy()), engine.reset()), 5)
    t_both = best_of(both, 5)
    benchmark(both)
    hidden = (t_compute + t_copy - t_both) / t_copy
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        compute_s=t_compute,
        copy_s=t_copy,
        both_s=t_both,
        fraction_hidden=min(1.0, hidden),
    )
