"""Grouped linear over the block-aligned dispatch of moe_align: y[t] = W[e_t] @ x[t] (+ b[e_t]).

Algorithm: align(expert_ids, E, BLOCK_M) groups the T tokens by expert, each expert's segment
padded to a multiple of BLOCK_M (sentinel T in the padding), and names the expert of each
BLOCK_M block. One GEMM kernel then computes, for each used block and each BLOCK_N slice of the
output columns, acc = x[tok(p)] @ W[e]^T over K in BLOCK_K steps (x rows gathered by index, no
permuted copy of x), adds b[e] in fp32 and stores straight into y's token rows (a token has one
expert, so every output row is written by exactly one block: no reduce, no atomics, and a
token's result does not depend on the rest of the batch within one config).

Grid: (cdiv(T + E*(BLOCK_M-1), BLOCK_M), cdiv(N, BLOCK_N)); blocks past the used ones read
expert -1 and return at once. The row-block index varies fastest, so the programs running side
by side share one weight column tile: each W tile comes from DRAM about once and the small x
(T*K) stays in L2. Launches per call: align's (moe_align.py) + 1 GEMM, whatever N is; the LM
head (N ~ 50k-128k) is just more column tiles.

Tiles (configs as data in fastdume/ops/grouped_linear.py, keyed by token class): BLOCK_M 16 for
decode-sized T (little padding waste; the weight stream is the cost), 64-128 for prefill so the
sm_90 dots are wgmma; BLOCK_N 64-128, BLOCK_K 64-128, so one stage (BLOCK_M + BLOCK_N) * BLOCK_K
* 2 bytes is 16-32 KiB in bf16 and 3-4 stages fit the 163 KiB (sm_80) / 227 KiB (sm_90) shared
memory (tests/test_grouped_linear_aot.py compiles every one). Accumulation is fp32. UPCAST
(interpreter only) turns bf16/fp16 tiles into fp32 because the interpreter's tl.dot has no bf16.
"""

import torch
import triton
import triton.language as tl
from fastdume.kernels.moe_align import align, slot_row_offset


@triton.jit
def grouped_linear_kernel(
    x_ptr,  # [T, K], row stride stride_xt, unit column stride
    w_ptr,  # [E, N, K] contiguous
    b_ptr,  # [E, N] contiguous (ignored unless HAS_BIAS)
    y_ptr,  # [T, N] contiguous out
    sorted_ptr,  # [P] int32 token ids grouped by expert, sentinel T for padding
    block_expert_ptr,  # [P / BLOCK_M] int32, -1 = unused block
    T,
    N,
    K,
    stride_xt,
    stride_we,  # N*K from the host: a Python int, so i64 when it needs it
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    if e < 0:
        return
    pos = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = tl.load(sorted_ptr + pos)
    valid = tokens < T
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = x_ptr + slot_row_offset(tokens, 1, stride_xt)[:, None] + ks[None, :]
    b_ptrs = w_ptr + e * stride_we + cols[None, :] * K + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(b_ptr + e * N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + slot_row_offset(tokens, 1, N)[:, None] + cols[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=valid[:, None] & col_ok[None, :],
    )


def dot_options(dtype, interpreted):
    """fp32 dots in IEEE precision (no tf32 surprise); 16-bit tiles upcast under the interpreter."""
    upcast = interpreted and dtype in (torch.bfloat16, torch.float16)
    return {"UPCAST": upcast, "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def grouped_linear(x, weight, expert_ids, bias, config):
    """y[t] = weight[e_t] @ x[t] (+ bias[e_t]) -> [T, N] in x's dtype; see the module docstring.

    x [T, K] with unit column stride; weight [E, N, K] and bias [E, N] contiguous; expert_ids [T]
    int64 in 0..E-1 (unchecked here); config: BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages.
    """
    num_tokens, k = x.shape
    num_experts, n, _ = weight.shape
    y = torch.empty(num_tokens, n, device=x.device, dtype=x.dtype)
    if num_tokens == 0 or n == 0:
        return y
    block_m = config["BLOCK_M"]
    sorted_tokens, block_expert = align(expert_ids, num_experts, block_m)
    tiles = {key: config[key] for key in ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")}
    grid = (block_expert.numel(), triton.cdiv(n, tiles["BLOCK_N"]))
    grouped_linear_kernel[grid](
        x, weight, weight if bias is None else bias, y, sorted_tokens, block_expert,
        num_tokens, n, k, x.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, **dot_options(x.dtype, x.device.type != "cuda"),
        **tiles,
    )  # fmt: skip
    return y
