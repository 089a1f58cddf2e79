"""Activation streaming throughput: C++ int8 codec vs the same torch ops, and stage-to-stage
transfer over loopback gloo (compressed / uncompressed) vs a raw send of the same bytes.

Ratios are measured in the same run and reported in benchmark.extra_info."""

import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from fastdume.ops import stream

BLOCK = 256


def _best_of(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _roundtrip(x, backend):
    codes, scales = stream.quantize(x, BLOCK, backend=backend)
    return stream.dequantize(codes, scales, x.shape, x.dtype, BLOCK, backend=backend)


@pytest.fixture(params=[1, None], ids=["1thread", "allthreads"])
def threads(request):
    # Both backends get the same budget: the C++ codec follows torch.get_num_threads().
    before = torch.get_num_threads()
    torch.set_num_threads(request.param or before)
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.mark.parametrize("mb", [1, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_roundtrip_cpp_vs_torch(benchmark, mb, dtype, threads):
    n = mb * 2**20 // torch.empty(0, dtype=dtype).element_size()
    x = torch.randn(n).to(dtype)
    if benchmark.disabled and mb > 1:  # smoke run: exercise the path, skip the slow baseline
        benchmark(_roundtrip, x, "cpp")
        return
    repeat = 1 if benchmark.disabled or mb == 64 else 3
    t_torch = _best_of(lambda: _roundtrip(x, "torch"), repeat)
    t_cpp = _best_of(lambda: _roundtrip(x, "cpp"), repeat)
    benchmark(_roundtrip, x, "cpp")
    nbytes = x.numel() * x.element_size()
    benchmark.extra_info.update(
        cpp_gb_s=nbytes / t_cpp / 1e9,
        torch_gb_s=nbytes / t_torch / 1e9,
        speedup_vs_torch=t_torch / t_cpp,
        threads=threads,
    )


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
        header, payload = stream.pack(x, step=0, micro_batch=0, stage=0, compress=compress)
        h_in, p_in = torch.empty_like(header), torch.empty_like(payload)
        _transfer(pgs, [header, payload], [h_in, p_in])
        return stream.unpack(h_in, p_in, stage=0, micro_batch=0, shape=x.shape)

    repeat = 1 if benchmark.disabled else 3
    t_raw = _best_of(lambda: _transfer(pgs, [x], [torch.empty_like(x)]), repeat)
    t = _best_of(once, repeat)
    y = benchmark(once)
    tol = 0 if compress != "int8" else float(x.abs().max()) / 127
    assert torch.allclose(y, x, atol=tol, rtol=0)
    benchmark.extra_info.update(
        mb_per_message=x.numel() * 4 / 2**20,
        gb_s=x.numel() * 4 / t / 1e9,
        raw_send_gb_s=x.numel() * 4 / t_raw / 1e9,
        ratio_vs_raw_send=t_raw / t,
    )


# ---- GPU (H100 targets: pinned copies >= 90% of torch's, >= 90% of a transfer hidden) ----


def _cuda_time(fn, repeat=5):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["d2h", "h2d"])
def test_pinned_copy_vs_torch(benchmark, direction):
    nbytes = 256 * 2**20
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    stager = stream.DeviceStager()
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

    t_ours, t_torch = _best_of(ours, 5), _best_of(theirs, 5)
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
    engine = stream.DeviceStager().engine
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

    t_compute = _cuda_time(compute)
    t_copy = _best_of(lambda: (engine.synchronize(copy()), engine.reset()), 5)
    t_both = _best_of(both, 5)
    benchmark(both)
    hidden = (t_compute + t_copy - t_both) / t_copy
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        compute_s=t_compute,
        copy_s=t_copy,
        both_s=t_both,
        fraction_hidden=min(1.0, hidden),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("mb", [1, 64])
def test_cuda_codec_vs_torch(benchmark, mb):
    x = torch.randn(mb * 2**20 // 2, device="cuda", dtype=torch.bfloat16)
    t_cuda = _cuda_time(lambda: _roundtrip(x, "cuda"))
    t_torch = _cuda_time(lambda: _roundtrip(x, "torch"))
    benchmark(lambda: (_roundtrip(x, "cuda"), torch.cuda.synchronize()))
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        gb_s=x.numel() * 2 / t_cuda / 1e9,
        speedup_vs_torch=t_torch / t_cuda,
    )
