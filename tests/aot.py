"""Ahead-of-time compilation of Triton kernels for real GPUs, usable on a CPU-only machine.

The test process runs Triton under the interpreter, which replaces `@triton.jit` functions, so
compilation happens in a child process with TRITON_INTERPRET unset. Each spec names a kernel by
module and attribute plus its signature, constexprs and launch options; the result reports the
shared memory the compiled kernel needs and which tensor-core instructions its PTX uses.
"""

import json
import os
import subprocess
import sys

# Largest opt-in shared memory per block: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_CHILD = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget

out = []
for spec in json.load(sys.stdin):
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    names = list(spec["signature"])
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.get("divisible", ())}
    src = triton.compiler.ASTSource(
        fn=fn, signature=spec["signature"], constexprs=spec.get("constexprs", {}), attrs=attrs
    )
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    try:
        k = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32), options=options)
    except Exception as exc:  # report, let the test name the failing config
        out.append({"error": f"{type(exc).__name__}: {exc}"[:2000]})
        continue
    ptx = k.asm["ptx"]
    out.append({
        "error": None,
        "shared": int(k.metadata.shared),
        "num_warps": int(k.metadata.num_warps),
        "wgmma": "wgmma" in ptx,
        "mma_sync": "mma.sync" in ptx,
    })
json.dump(out, sys.stdout)
"""


def compile_specs(specs, timeout=900):
    """Compile every spec (dicts: module, kernel, signature, constexprs, arch, num_warps,
    num_stages, optional divisible) in one child process; returns one result dict per spec, in
    order. `divisible` names the arguments to compile as multiples of 16 (pointers: 16-byte
    aligned), as Triton's JIT specialises them at a real launch with such values; only then are
    16-bit loads vectorised and the K loop software-pipelined (num_stages buffers in shared
    memory), so a spec without it under-counts the shared memory of that launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps(specs),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)
