"""Ahead-of-time compile of every shipped MoE kernel configuration for sm_80 and sm_90 (no GPU
needed): it compiles, its shared memory fits the card, and on sm_90 the bf16/fp16 GEMMs use wgmma.
The design options the tuner may pick (benches/tune_moe.py: swap-AB tiles, split-K's reduce, the
one-launch routing + alignment) are compiled too: a core set here, the whole grid in a slow test.
"""

import functools
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aot import SHARED_LIMIT, compile_specs

from fastdume.ops import moe_configs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import tune_moe  # noqa: E402

GROUPED = "fastdume.kernels.moe_grouped"


def file_archs(name):
    """default.json serves every card; device files (all Hopper so far) only their own."""
    return (80, 90) if name == "default.json" else (90,)


def _gemm_spec(which, dtype, cfg, block_m, arch):
    gemm = cfg[which]
    ptr = f"*{dtype}"
    if which == "gemm1":
        sig = {"x_ptr": ptr, "w_ptr": ptr, "h_ptr": ptr, "sorted_ptr": "*i32",
               "block_expert_ptr": "*i32", "S": "i32", "H": "i32", "inter": "i32",
               "stride_xt": "i32", "stride_we": "i32", "up_offset": "i32"}  # fmt: skip
        kernel, extra = "moe_gemm1_kernel", {"TOP_K": 2}
    else:
        sig = {"h_ptr": ptr, "w_ptr": ptr, "y_ptr": "*fp32", "sorted_ptr": "*i32",
               "block_expert_ptr": "*i32", "topk_w_ptr": "*fp32", "S": "i32", "H": "i32",
               "inter": "i32", "stride_we": "i32", "k_per_split": "i32",
               "stride_ys": "i32"}  # fmt: skip
        kernel, extra = "moe_gemm2_kernel", {}
    consts = {"UPCAST": False, "PRECISION": "tf32", "BLOCK_M": block_m,
              "SWAP_AB": gemm.get("SWAP_AB", False), "BLOCK_N": gemm["BLOCK_N"],
              "BLOCK_K": gemm["BLOCK_K"], **extra}  # fmt: skip
    sig.update({k: "constexpr" for k in consts})
    launch = {"num_warps": gemm["num_warps"], "num_stages": gemm["num_stages"]}
    return {"module": GROUPED, "kernel": kernel, "signature": sig, "constexprs": consts,
            "arch": arch, **launch}  # fmt: skip


def _gemm_specs():
    seen, specs = set(), []
    for name, _key, _i, cfg in moe_configs.all_shipped():
        for arch in file_archs(name):
            for which in ("gemm1", "gemm2"):
                ident = (arch, which, cfg["BLOCK_M"], tuple(sorted(cfg[which].items())))
                if ident in seen:
                    continue
                seen.add(ident)
                specs.append(_gemm_spec(which, "bf16", cfg, cfg["BLOCK_M"], arch))
    # fp16 shares the code path; one config per GEMM on sm_90 shows it also gets wgmma.
    default = moe_configs.load_file("default.json")["buckets"][-1]["config"]
    specs += [_gemm_spec(w, "fp16", default, default["BLOCK_M"], 90) for w in ("gemm1", "gemm2")]
    return specs


def _design_specs(core):
    """The swap-AB tiles the tuner tries (BLOCK_M < 64, both GEMMs, bf16), for both cards."""
    specs = []
    for block_m in (16, 32) if not core else (16,):
        for tile in tune_moe.swap_space():
            key = (tile["BLOCK_N"], tile["BLOCK_K"], tile["num_stages"])
            if core != (key in {(128, 256, 4), (64, 64, 3)} and block_m == 16):
                continue
            cfg = {"BLOCK_M": block_m, "gemm1": tile, "gemm2": tile}
            for arch in (80, 90):
                specs += [_gemm_spec(w, "bf16", cfg, block_m, arch) for w in ("gemm1", "gemm2")]
    return specs


def _small_specs(arch):
    route_sig = {"x_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*fp32", "weights_ptr": "*fp32",
                 "ids_ptr": "*i64", "T": "i32", "H": "i32", "E": "i32",
                 "temperature": "fp32", "stride_xt": "i32"}  # fmt: skip
    route_c = {"HAS_BIAS": True, "TOP_K": 2, "BLOCK_K": 2, "BLOCK_T": 16, "BLOCK_E": 16,
               "BLOCK_H": 64}  # fmt: skip
    fused_sig = {**route_sig, "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "P": "i32"}
    fused_sig = {k: fused_sig[k] for k in (*list(route_sig)[:5], "sorted_ptr",
                 "block_expert_ptr", "T", "H", "E", "P", "temperature", "stride_xt")}  # fmt: skip
    fused_c = {**route_c, "BLOCK_M": 16, "BLOCK_S": 256}
    align_sig = {"ids_ptr": "*i64", "sorted_ptr": "*i32", "block_expert_ptr": "*i32",
                 "S": "i32", "E": "i32", "P": "i32"}  # fmt: skip
    align_c = {"BLOCK_M": 64, "BLOCK_S": 1024, "BLOCK_E": 8}
    reduce_sig = {"y_ptr": "*fp32", "out_ptr": "*bf16", "T": "i32", "H": "i32",
                  "stride_ys": "i32"}  # fmt: skip
    out = []
    for module, kernel, sig, consts in (
        ("fastdume.kernels.moe_routing", "moe_route_kernel", route_sig, route_c),
        ("fastdume.kernels.moe_routing", "moe_route_align_kernel", fused_sig, fused_c),
        ("fastdume.kernels.moe_align", "moe_align_kernel", align_sig, align_c),
        *[(GROUPED, "moe_reduce_kernel", reduce_sig,
           {"TOP_K": k, "SPLIT_K": split, "BLOCK_T": 16, "BLOCK_H": 128})
          for k, split in ((2, 1), (1, 4), (2, 8))],
    ):  # fmt: skip
        sig = {**sig, **{k: "constexpr" for k in consts}}
        out.append({"module": module, "kernel": kernel, "signature": sig, "constexprs": consts,
                    "arch": arch})  # fmt: skip
    return out


@functools.cache
def _compile(core):
    specs = _design_specs(core)
    if core:
        specs = _gemm_specs() + _small_specs(80) + _small_specs(90) + specs
    halves = [specs[0::2], specs[1::2]]  # two child processes: CI has two cores
    with ThreadPoolExecutor(2) as pool:
        even, odd = pool.map(compile_specs, halves)
    results = [None] * len(specs)
    results[0::2], results[1::2] = even, odd
    return list(zip(specs, results, strict=True))


@pytest.fixture(scope="module")
def compiled():
    return _compile(True)


def _fits(compiled):
    for spec, result in compiled:
        what = f"{spec['kernel']} sm_{spec['arch']} {spec['constexprs']}"
        assert result["error"] is None, f"{what}: {result['error']}"
        assert 0 <= result["shared"] <= SHARED_LIMIT[spec["arch"]], f"{what}: {result['shared']}"


def test_every_shipped_config_compiles_and_fits(compiled):
    assert len(compiled) >= 10
    _fits(compiled)


def _swap_uses_wgmma(compiled):
    """Swap-AB's point: with BLOCK_M 16-32 the weight side (BLOCK_N >= 64) is the MMA's M, so
    sm_90 gets wgmma where the plain decode tiles get mma.sync."""
    swapped = [(s, r) for s, r in compiled if s["constexprs"].get("SWAP_AB")]
    assert swapped and {s["arch"] for s, _ in swapped} == {80, 90}
    for spec, result in swapped:
        what = f"{spec['kernel']} sm_{spec['arch']} {spec['constexprs']}"
        assert result["wgmma"] if spec["arch"] == 90 else result["mma_sync"], what


def test_swap_ab_tiles_use_wgmma_on_sm90(compiled):
    _swap_uses_wgmma(compiled)


@pytest.mark.slow
def test_every_tuner_design_tile_compiles_fits_and_uses_wgmma():
    compiled = _compile(False)
    _fits(compiled)
    _swap_uses_wgmma(compiled)


def test_sm90_gemms_use_wgmma_and_sm80_mma(compiled):
    """wgmma needs 64 rows per warpgroup: the BLOCK_M 16 decode configs use mma.sync by design
    (memory-bound there: the tile's job is to stream the weights, not to fill tensor cores)."""
    gemms = [(s, r) for s, r in compiled
             if s["kernel"].startswith("moe_gemm") and not s["constexprs"]["SWAP_AB"]]  # fmt: skip
    assert {s["signature"]["w_ptr"] for s, _ in gemms} == {"*bf16", "*fp16"}
    assert any(s["arch"] == 90 and s["constexprs"]["BLOCK_M"] >= 64 for s, _ in gemms)
    for spec, result in gemms:
        what = f"{spec['kernel']} {spec['signature']['w_ptr']} {spec['constexprs']}"
        if spec["arch"] == 90 and spec["constexprs"]["BLOCK_M"] >= 64:
            assert result["wgmma"], f"{what}: no wgmma in sm_90 PTX"
        else:
            assert result["mma_sync"], f"{what}: no mma.sync in PTX"
