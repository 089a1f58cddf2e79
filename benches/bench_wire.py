"""Stage-to-stage transfer of wire messages over loopback gloo (compressed / uncompressed) vs a
raw send of the same bytes.

Ratios are measured in the same run and reported in benchmark.extra_info."""

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from timing import best_of

from fastdume.ops import wire


def _gloo_pair():
    store = dist.HashStore()
    pgs = [None, None]

    def make(rank):
        pgs[rank] = dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=30))

    threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return pgs


def _transfer(pgs, tensors_out, tensors_in):
    """Send each tensor from rank 0 to rank 1 (receiver on its own thread)."""

    def recv():
        for i, t in enumerate(tensors_in):
            pgs[1].recv([t], 0, i).wait()

    th = threading.Thread(target=recv)
    th.start()
    for i, t in enumerate(tensors_out):
        pgs[0].send([t], 1, i).wait()
    th.join()


@pytest.mark.parametrize("compress", ["raw", "none", "int8"])
def test_loopback_gloo_transfer(benchmark, compress):
    x = torch.randn(8, 128, 1024)  # 4 MiB fp32 activations of one micro-batch
    pgs = _gloo_pair()

    def once():
        if compress == "raw":
            y = torch.empty_like(x)
            _transfer(pgs, [x], [y])
            return y
        header, payload = wire.pack(x, step=0, micro_batch=0, stage=0, compress=compress)
        h_in, p_in = torch.empty_like(header), torch.empty_like(payload)
        _transfer(pgs, [header, payload], [h_in, p_in])
        return wire.unpack(h_in, p_in, stage=0, micro_batch=0, shape=x.shape)

    repeat = 1 if benchmark.disabled else 3
    t_raw = best_of(lambda: _transfer(pgs, [x], [torch.empty_like(x)]), repeat)
    t = best_of(once, repeat)
    y = benchmark(once)
    tol = 0 if compress != "int8" else float(x.abs().max()) / 127
    assert torch.allclose(y, x, atol=tol, rtol=0)
    benchmark.extra_info.update(
        mb_per_message=x.numel() * 4 / 2**20,
        gb_s=x.numel() * 4 / t / 1e9,
        raw_send_gb_s=x.numel() * 4 / t_raw / 1e9,
        ratio_vs_raw_send=t_raw / t,
    )
