"""Ahead-of-time compile of every shipped grouped-linear configuration for sm_80 and sm_90 (no GPU
needed): it compiles, its pipelined shared memory fits the card, and on sm_90 the 16-bit GEMMs of
the BLOCK_M >= 64 token classes use wgmma (BLOCK_M 16 decode tiles use mma.sync, as in the MoE)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from aot import SHARED_LIMIT, compile_specs

from fastdume.ops import grouped_linear as gl

# Model shapes (K, N, strides: 576, 1728, 49152, 2048, ...) are multiples of 16, so the JIT
# compiles them pipelined: the largest shared memory a launch of these tiles needs.
DIVISIBLE = ["x_ptr", "w_ptr", "b_ptr", "y_ptr", "sorted_ptr", "block_expert_ptr", "N", "K",
             "stride_xt", "stride_we"]  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _spec(name, dtype, arch, has_bias):
    config = gl.for_dtype(gl.tiles(gl.CONFIGS[name]), DTYPES[dtype])
    ptr = f"*{dtype}"
    sig = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr, "sorted_ptr": "*i32",
           "block_expert_ptr": "*i32", "T": "i32", "N": "i32", "K": "i32", "stride_xt": "i32",
           "stride_we": "i32"}  # fmt: skip
    consts = {"HAS_BIAS": has_bias, "UPCAST": False,
              "PRECISION": "ieee" if dtype == "fp32" else "tf32",
              **{k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}}  # fmt: skip
    sig.update({k: "constexpr" for k in consts})
    return {"module": "fastdume.kernels.grouped_linear", "kernel": "grouped_linear_kernel",
            "signature": sig, "constexprs": consts, "arch": arch, "divisible": DIVISIBLE,
            "num_warps": config["num_warps"], "num_stages": config["num_stages"]}  # fmt: skip


def _specs():
    """Every token class for both cards in bf16 (bias on: the longer epilogue) and in fp32 (its
    halved BLOCK_K) on sm_80, the smaller shared memory; fp16 and the bias-free variant share
    the code path, so one each on sm_90."""
    specs = [_spec(name, "bf16", arch, True) for name in gl.CONFIGS for arch in (80, 90)]
    specs += [_spec(name, "fp32", 80, True) for name in gl.CONFIGS]
    return specs + [_spec("prefill", "fp16", 90, True), _spec("prefill", "bf16", 90, False)]


@pytest.fixture(scope="module")
def compiled():
    specs = _specs()
    halves = [specs[0::2], specs[1::2]]  # two child processes: CI has two cores
    with ThreadPoolExecutor(2) as pool:
        even, odd = pool.map(compile_specs, halves)
    results = [None] * len(specs)
    results[0::2], results[1::2] = even, odd
    return list(zip(specs, results, strict=True))


def _what(spec):
    return f"sm_{spec['arch']} {spec['signature']['w_ptr']} {spec['constexprs']}"


def test_every_shipped_config_compiles_and_fits(compiled):
    assert len(compiled) == 3 * len(gl.CONFIGS) + 2
    for spec, result in compiled:
        assert result["error"] is None, f"{_what(spec)}: {result['error']}"
        limit = SHARED_LIMIT[spec["arch"]]
        assert 0 < result["shared"] <= limit, f"{_what(spec)}: {result['shared']} bytes"


def test_16bit_gemms_use_tensor_cores(compiled):
    sixteen = [(s, r) for s, r in compiled if s["signature"]["w_ptr"] != "*fp32"]
    assert {s["signature"]["w_ptr"] for s, _ in sixteen} == {"*bf16", "*fp16"}
    assert any(s["arch"] == 90 and s["constexprs"]["BLOCK_M"] >= 64 for s, _ in sixteen)
    for spec, result in sixteen:
        if spec["arch"] == 90 and spec["constexprs"]["BLOCK_M"] >= 64:
            assert result["wgmma"], f"{_what(spec)}: no wgmma in sm_90 PTX"
        else:
            assert result["mma_sync"], f"{_what(spec)}: no mma.sync in PTX"
