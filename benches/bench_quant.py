"""int8 codec throughput: the C++ codec vs the same torch ops on the CPU, the CUDA codec vs the
torch ops on a GPU (target: several times faster).

Ratios are measured in the same run and reported in benchmark.extra_info."""

import pytest
import torch
from timing import best_of, cuda_seconds

from fastdume.ops import quant

BLOCK = 256


def _roundtrip(x, backend):
    codes, scales = quant.quantize(x, BLOCK, backend=backend)
    return quant.dequantize(codes, scales, x.shape, x.dtype, BLOCK, backend=backend)


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
    t_torch = best_of(lambda: _roundtrip(x, "torch"), repeat)
    t_cpp = best_of(lambda: _roundtrip(x, "cpp"), repeat)
    benchmark(_roundtrip, x, "cpp")
    nbytes = x.numel() * x.element_size()
    benchmark.extra_info.update(
        cpp_gb_s=nbytes / t_cpp / 1e9,
        torch_gb_s=nbytes / t_torch / 1e9,
        speedup_vs_torch=t_torch / t_cpp,
        threads=threads,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("mb", [1, 64])
def test_cuda_codec_vs_torch(benchmark, mb):
    x = torch.randn(mb * 2**20 // 2, device="cuda", dtype=torch.bfloat16)
    t_cuda = cuda_seconds(lambda: _roundtrip(x, "cuda"))
    t_torch = cuda_seconds(lambda: _roundtrip(x, "torch"))
    benchmark(lambda: (_roundtrip(x, "cuda"), torch.cuda.synchronize()))
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        gb_s=x.numel() * 2 / t_cuda / 1e9,
        speedup_vs_torch=t_torch / t_cuda,
    )
