"""Ahead-of-time compile of every shipped Gram and Cholesky configuration for sm_80 and sm_90:
it must compile, fit the architecture's shared memory, and use wgmma on sm_90 for 16-bit dots."""

import functools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from aot import SHARED_LIMIT, compile_specs

from fastdume.ops.gram import _triton_dtypes

ARCHS = (80, 90)
PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}


def _gram_spec(arch, x, store, precision, has_mask, atomic, schedule=None):
    # The shipped GPU config of fastdume.ops.gram._config (tile sizes) and _triton_dtypes.
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[x]
    round_dtype, dot_dtype, input_precision = _triton_dtypes(
        getattr(torch, torch_dtype), precision, interpreted=False
    )
    ints = ["N", "H", "tokens_per_split", "stride_xl", "stride_xn", "stride_xh"]
    ints += ["stride_gl", "stride_gr", "stride_gc", "stride_sl"]
    schedule = schedule or {}
    constexprs = {
        "HAS_MASK": has_mask,
        "ATOMIC": atomic,
        "PARTIAL": schedule.get("PARTIAL", False),
        "ROUND_DTYPE": round_dtype,
        "DOT_DTYPE": dot_dtype,
        "PRECISION": input_precision,
        "BLOCK_H": schedule.get("BLOCK_H", 128),
        "BLOCK_N": schedule.get("BLOCK_N", 32 if x == "fp32" else 64),
        "GROUP_H": schedule.get("GROUP_H", 0),
    }
    signature = {"x_ptr": PTR[x], "mask_ptr": "*i8", "gram_ptr": PTR[store]}
    signature |= {"colsum_ptr": PTR[store], "count_ptr": "*i32"}
    signature |= {"part_ptr": "*fp32", "psum_ptr": "*fp32"}
    signature |= {k: "i32" for k in ints} | {k: "constexpr" for k in constexprs}
    return {
        "module": "fastdume.kernels.gram",
        "kernel": "gram_kernel",
        "signature": signature,
        "constexprs": constexprs,
        "arch": arch,
        "num_warps": schedule.get("num_warps", 8),
        "num_stages": schedule.get("num_stages", 3),
        "tensor16": round_dtype != "fp32",
    }


# Gram schedule options benches/tune_ridge.py may pick (bf16 inputs, fp32 statistics): larger
# tiles, grouped order, the ordered split; the core run compiles the first two on both cards.
SCHEDULES = [
    {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"GROUP_H": 8, "PARTIAL": True},
    {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "GROUP_H": 8},
    {"BLOCK_N": 128, "num_warps": 16, "num_stages": 2, "GROUP_H": 8, "PARTIAL": True},
]


def _schedule_specs(schedules):
    specs = []
    for arch, schedule in ((a, s) for a in ARCHS for s in schedules):
        if arch == 80 and schedule.get("BLOCK_N") == 128 and schedule["num_stages"] > 2:
            continue  # 3 stages of two 128 x 128 bf16 operands need 192 KiB: sm_90 only
        specs.append(_gram_spec(arch, "bf16", "fp32", None, False, False, schedule))
        reduce_sig = {"part_ptr": "*fp32", "psum_ptr": "*fp32", "gram_ptr": "*fp32"}
        reduce_sig |= {"colsum_ptr": "*fp32", "H": "i32", "splits": "i32"}
        reduce_sig |= dict.fromkeys(["stride_gl", "stride_gr", "stride_gc", "stride_sl"], "i32")
        cx = {"BLOCK_H": schedule.get("BLOCK_H", 128)}
        specs.append(
            {"module": "fastdume.kernels.gram", "kernel": "gram_reduce_kernel",
             "signature": reduce_sig | {"BLOCK_H": "constexpr"}, "constexprs": cx,
             "arch": arch, "num_warps": 8, "num_stages": 1, "tensor16": False}
        )  # fmt: skip
    return specs


def _gram_specs():
    cases = [(x, None) for x in ("bf16", "fp16")]
    cases += [("fp32", p) for p in ("fp32", "tf32", "tf32x3", "bf16")]
    specs = []
    for arch in ARCHS:
        for x, precision in cases:
            for store in ("fp32", "fp64"):
                for has_mask, atomic in ((False, False), (True, True)):
                    specs.append(_gram_spec(arch, x, store, precision, has_mask, atomic))
    return specs


def _cholesky_specs():
    specs = []
    strides3 = ["stride_ab", "stride_ar", "stride_ac"]
    for arch in ARCHS:
        for bs in (32, 64):  # fastdume.ops.ridge._solver_config: 32 for n <= 128, else 64
            common = {"PRECISION": "tf32x3", "BS": bs}
            diag = {"a_ptr": "*fp32", "dinv_ptr": "*fp32", "info_ptr": "*i32", "n": "i32"}
            diag |= {"k0": "i32"} | dict.fromkeys(strides3 + ["stride_db", "stride_dk"], "i32")
            panel = {k: v for k, v in diag.items() if k != "info_ptr"}
            update = {"a_ptr": "*fp32", "n": "i32", "k0": "i32"} | dict.fromkeys(strides3, "i32")
            solve = {"l_ptr": "*fp32", "dinv_ptr": "*fp32", "x_ptr": "*fp32", "n": "i32"}
            solve |= {"m": "i32", "stride_lb": "i32", "stride_lr": "i32", "stride_lc": "i32"}
            solve |= dict.fromkeys(["stride_db", "stride_dk", "stride_xb"], "i32")
            solve |= {"stride_xr": "i32", "stride_xc": "i32"}
            small = {"a_ptr": "*fp32", "dinv_ptr": "*fp32", "info_ptr": "*i32", "x_ptr": "*fp32"}
            small |= dict.fromkeys(["n", "m", *strides3, "stride_db", "stride_dk"], "i32")
            small |= dict.fromkeys(["stride_xb", "stride_xr", "stride_xc"], "i32")
            small_cx = common | {"LOG_BS": bs.bit_length() - 1, "BR": 64, "BM": 16}
            for kernel, sig, cx in (
                ("small_kernel", small, small_cx | {"FACTOR": True}),
                ("small_kernel", small, small_cx | {"FACTOR": False}),
                ("factor_diag_kernel", diag, common | {"LOG_BS": bs.bit_length() - 1}),
                ("panel_kernel", panel, common | {"BR": 64}),
                ("update_kernel", update, common | {"BT": bs}),
                ("solve_kernel", solve, common | {"TRANS": False, "BM": 32}),
                ("solve_kernel", solve, common | {"TRANS": True, "BM": 32}),
            ):
                specs.append(
                    {
                        "module": "fastdume.kernels.cholesky",
                        "kernel": kernel,
                        "signature": sig | dict.fromkeys(cx, "constexpr"),
                        "constexprs": cx,
                        "arch": arch,
                        "num_warps": 4,
                        "num_stages": 1 if kernel == "small_kernel" else 2,
                        "tensor16": False,
                    }
                )
    return specs


def _core(spec):
    """One compile per distinct code path (the default CI run); the slow test compiles the rest."""
    cx = spec["constexprs"]
    if spec["kernel"] == "small_kernel":  # ops.ridge._solver_config: BS 32 for n <= 128
        return cx["BS"] == 32
    if spec["kernel"] != "gram_kernel":
        return cx["BS"] == 64
    return (cx["ROUND_DTYPE"], cx["PRECISION"], cx["HAS_MASK"]) in {
        ("bf16", "ieee", False),
        ("fp16", "ieee", True),
        ("fp32", "tf32x3", False),
        ("fp32", "ieee", True),
    }


@functools.cache
def _compiled(core):
    specs = [s for s in _gram_specs() + _cholesky_specs() if _core(s) == core]
    specs += _schedule_specs(SCHEDULES[:2] if core else SCHEDULES[2:])
    plain = [{k: v for k, v in s.items() if k != "tensor16"} for s in specs]
    # Two child processes (one per CI core): compiling is the slow part of this file.
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(compile_specs, (plain[0::2], plain[1::2])))
    results = [None] * len(specs)
    results[0::2], results[1::2] = halves
    return list(zip(specs, results, strict=True))


def _name(spec):
    return f"{spec['kernel']} sm_{spec['arch']} {spec['constexprs']}"


def _check_all(compiled):
    for spec, res in compiled:
        assert res["error"] is None, f"{_name(spec)}: {res['error']}"
        assert res["shared"] <= SHARED_LIMIT[spec["arch"]], f"{_name(spec)}: {res['shared']} B"
        if spec["tensor16"]:  # bf16/fp16 Gram dots: wgmma on Hopper, mma.sync on Ampere
            key = "wgmma" if spec["arch"] == 90 else "mma_sync"
            assert res[key], f"{_name(spec)} does not use {key}"
        if spec["kernel"] in ("update_kernel", "small_kernel"):  # tf32x3 dots on tensor cores
            assert res["wgmma"] or res["mma_sync"], f"{_name(spec)} has no tensor-core dot"


def test_core_configs_compile_fit_and_use_tensor_cores():
    compiled = _compiled(True)
    assert {(s["kernel"], s["arch"]) for s, _ in compiled} >= {
        (k, a)
        for k in (
            "gram_kernel",
            "factor_diag_kernel",
            "panel_kernel",
            "update_kernel",
            "solve_kernel",
            "small_kernel",
        )
        for a in ARCHS
    }
    assert sum(s["tensor16"] and s["arch"] == 90 for s, _ in compiled) >= 2
    _check_all(compiled)


@pytest.mark.slow
def test_every_other_shipped_config():
    _check_all(_compiled(False))
