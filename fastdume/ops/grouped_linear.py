"""Per-token expert tensors: a grouped linear (each token through its expert's weight) and the
per-token gathers of embedding rows and norm weights, for models that route every tensor.

Contract:
  grouped_linear(x [T, K], weight [E, N, K], expert_ids [T], bias [E, N] or None) -> [T, N]
      y[t] = weight[e_t] @ x[t] (+ bias[e_t]), in x's dtype, accumulated in (at least) fp32.
      weight and bias have x's dtype and device and are contiguous; expert_ids are int64 (or
      int32) in 0..E-1. A token's row depends only on that token, its expert and the launch
      config (so not on the rest of the batch within one token class).
  gather_rows(table [E, V, H], expert_ids [T], token_ids [T]) -> [T, H]: table[e_t, v_t]
  gather_vectors(table [E, H], expert_ids [T]) -> [T, H]: table[e_t]
  check_ids=True reads the ids on the host to verify their range (a device sync on CUDA); pass
  False for ids that come from a router. Unchecked gathers are still bounds-checked by torch,
  and so are expert ids on grouped_linear's torch path; on its Triton path a token with an
  expert id outside 0..E-1 gets no output row written (as moe_experts with check_ids=False).

grouped_linear's torch path groups tokens by expert and runs one matmul per expert on its own
rows (one plain linear when a single expert has every token; an expert whose tokens form one
contiguous run writes its slice of the output in place when no gradient is wanted), so its cost
is one dense linear plus the row gather and scatter, not E of them. The Triton path
(backend="triton"; the default on CUDA) is kernels/moe_align.py (block-aligned dispatch, k = 1)
+ kernels/grouped_linear.py (one GEMM launch for any N: q/k/v fused, o, LM head). It is the
custom op `fastdume::grouped_linear` (opaque to torch.compile, with a fake implementation); its
backward is torch ops, not kernels (`grouped_linear_backward`: grouped per expert like the
forward). The torch path's autograd is torch's own.

The gathers are torch indexing on every device: each is a single memory-bound gather launch
already (a lookup of whole rows in the flattened table), which a Triton kernel could at best
tie. benches/bench_grouped_linear.py times them against dense lookups of the same size.

Launch configs of the GEMM are data (CONFIGS below), keyed by token class; with
FASTDUME_MOE_AUTOTUNE=1 (the MoE GEMMs' switch) each (device, shape, power-of-two token bucket)
times the shipped configs once and keeps the fastest in $FASTDUME_CACHE/
grouped_linear_autotune.json.
"""

import torch
import torch.nn.functional as F

from fastdume.ops import _backend, moe_configs

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int64, torch.int32)

# Token classes, the first whose max_tokens >= T. Not yet tuned on a card (no GPU session so
# far): chosen so each fits sm_80 and sm_90 shared memory (tests/test_grouped_linear_aot.py) and
# the prefill classes' BLOCK_M >= 64 gets wgmma on sm_90. Decode streams the weights: BLOCK_M 16
# wastes the least on padding and BLOCK_N 64 gives N / 64 programs per expert to stream them.
# BLOCK_K is for 16-bit inputs; fp32 runs half of it (for_dtype).
CONFIGS = {
    "decode": {"max_tokens": 64, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128,
               "num_warps": 4, "num_stages": 4},
    "batch": {"max_tokens": 1024, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64,
              "num_warps": 4, "num_stages": 4},
    "prefill": {"max_tokens": None, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64,
                "num_warps": 8, "num_stages": 3},
}  # fmt: skip
# The Triton interpreter on a CPU runs one numpy op per tile op: small tiles.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}


def tiles(entry):
    """A CONFIGS entry without its token limit: what the kernel takes."""
    return {k: v for k, v in entry.items() if k != "max_tokens"}


def config_for(num_tokens, dtype):
    """The shipped launch config of a token count (its token class) and an input dtype."""
    for entry in CONFIGS.values():
        if entry["max_tokens"] is None or num_tokens <= entry["max_tokens"]:
            return for_dtype(tiles(entry), dtype)
    raise AssertionError("the last token class has no limit")


def for_dtype(config, dtype):
    """fp32 tiles take twice the bytes: half the BLOCK_K keeps each stage's shared memory."""
    if dtype.itemsize == 4:
        return {**config, "BLOCK_K": config["BLOCK_K"] // 2}
    return config


def _check_ids(name, ids, num_tokens, bound, device, check_range):
    if ids.dtype not in ID_DTYPES:
        raise ValueError(f"{name} must be int64 or int32, got {ids.dtype}")
    if tuple(ids.shape) != (num_tokens,):
        raise ValueError(f"{name} must be [T={num_tokens}], got shape {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the table/x is on {device}")
    # The range check reads the ids on the host; skip it while a CUDA graph is being captured.
    check_range = check_range and not (ids.is_cuda and torch.cuda.is_current_stream_capturing())
    if check_range and ids.numel() and (ids.min() < 0 or ids.max() >= bound):
        raise ValueError(
            f"{name} must lie in 0..{bound - 1}, got values in {int(ids.min())}..{int(ids.max())}"
        )
    return check_range


def _check_linear(x, weight, expert_ids, bias, check_ids):
    if x.dim() != 2:
        raise ValueError(f"x must be [T, K], got shape {tuple(x.shape)}")
    if weight.dim() != 3 or weight.shape[2] != x.shape[1]:
        raise ValueError(f"weight must be [E, N, K={x.shape[1]}], got shape {tuple(weight.shape)}")
    num_experts, n, _ = weight.shape
    if num_experts == 0:
        raise ValueError("weight must hold at least one expert, got E = 0")
    if bias is not None and tuple(bias.shape) != (num_experts, n):
        raise ValueError(f"bias must be [E={num_experts}, N={n}], got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _check_ids("expert_ids", expert_ids, x.shape[0], num_experts, x.device, check_ids)


def _groups(expert_ids, num_experts):
    """(expert, its token rows) for each expert with tokens, rows in ascending token order."""
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=num_experts).tolist()
    if len(counts) > num_experts:  # unchecked ids past E: refuse rather than leave rows unset
        raise ValueError(f"expert_ids must lie in 0..{num_experts - 1}, got {len(counts) - 1}")
    groups, start = [], 0
    for e, count in enumerate(counts):
        if count:
            groups.append((e, order[start : start + count]))
        start += count
    return groups


def grouped_linear_torch(x, weight, expert_ids, bias=None):
    """Reference and CPU path: one linear per expert on the rows routed to it."""
    groups = _groups(expert_ids, weight.shape[0])
    if len(groups) == 1:  # every token on one expert (common with context routing): no gather
        e = groups[0][0]
        return F.linear(x, weight[e], None if bias is None else bias[e])
    out = x.new_empty(x.shape[0], weight.shape[1])
    # out= has no autograd: write in place only when no gradient is wanted.
    in_place = not _wants_grad(x, weight, bias)
    for e, rows in groups:
        b = None if bias is None else bias[e]
        first, last = int(rows[0]), int(rows[-1])
        if in_place and last - first + 1 == rows.numel():
            # A contiguous run of tokens (a sequence on one expert): no gather, no scatter copy.
            run = slice(first, last + 1)
            w = weight[e].T
            if b is None:
                torch.mm(x[run], w, out=out[run])
            else:
                torch.addmm(b, x[run], w, out=out[run])
        else:
            out[rows] = F.linear(x[rows], weight[e], b)
    return out


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def grouped_linear(x, weight, expert_ids, bias=None, backend=None, check_ids=True):
    """y[t] = weight[e_t] @ x[t] (+ bias[e_t]) -> [T, N] in x's dtype. See the module docstring."""
    _check_linear(x, weight, expert_ids, bias, check_ids)
    if _backend.resolve(backend, x.device) == "torch":
        return grouped_linear_torch(x, weight, expert_ids, bias)
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"x dtype must be one of {TRITON_DTYPES} for backend='triton', got {x.dtype}"
        )
    if x.stride(1) != 1:
        x = x.contiguous()
    return torch.ops.fastdume.grouped_linear(x, weight, expert_ids, bias)


def _config(kern, x, weight, expert_ids, bias):
    if x.device.type != "cuda":
        return dict(INTERPRETER_CONFIG)
    if not moe_configs.autotune_enabled():
        return config_for(x.shape[0], x.dtype)
    import triton.testing

    def measure(config):
        return triton.testing.do_bench(
            lambda: kern.grouped_linear(x, weight, expert_ids, bias, config)
        )

    num_experts, n, k = weight.shape
    key = (
        f"{moe_configs.device_name(x.device)}|E={num_experts},N={n},K={k},"
        f"dtype={str(x.dtype).removeprefix('torch.')},bias={bias is not None}"
        f"|T<={moe_configs.token_bucket(x.shape[0])}"
    )
    candidates = [for_dtype(tiles(entry), x.dtype) for entry in CONFIGS.values()]
    path = moe_configs.autotune_path().with_name("grouped_linear_autotune.json")
    return moe_configs.tuned_config(key, candidates, measure, path)


@torch.library.custom_op("fastdume::grouped_linear", mutates_args=())
def grouped_linear_op(
    x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    kern = _backend.kernels("grouped_linear", x.device)
    return kern.grouped_linear(
        x, weight, expert_ids, bias, _config(kern, x, weight, expert_ids, bias)
    )


@grouped_linear_op.register_fake
def _(x, weight, expert_ids, bias):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("fastdume::grouped_linear_backward", mutates_args=())
def grouped_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_ids: torch.Tensor,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d x, d weight, d bias or an empty tensor), torch ops grouped per expert."""
    dx = torch.zeros_like(x)
    d_weight = torch.zeros_like(weight)
    acc = torch.promote_types(x.dtype, torch.float32)
    d_bias = x.new_zeros(weight.shape[:2] if has_bias else (0,), dtype=acc)
    for e, rows in _groups(expert_ids, weight.shape[0]):
        go = grad_out[rows]
        dx[rows] = go @ weight[e]
        d_weight[e] = go.T @ x[rows]
        if has_bias:
            d_bias[e] = go.to(acc).sum(dim=0)
    return dx, d_weight, d_bias.to(x.dtype)


@grouped_linear_backward.register_fake
def _(grad_out, x, weight, expert_ids, has_bias):
    d_bias = x.new_empty(weight.shape[:2] if has_bias else (0,))
    return torch.empty_like(x), torch.empty_like(weight), d_bias


def _setup_context(ctx, inputs, output):
    x, weight, expert_ids, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, expert_ids)


def _backward(ctx, grad_out):
    x, weight, expert_ids = ctx.saved_tensors
    dx, d_weight, d_bias = torch.ops.fastdume.grouped_linear_backward(
        grad_out.contiguous(), x, weight, expert_ids, ctx.has_bias
    )
    return dx, d_weight, None, d_bias if ctx.has_bias else None


grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


def gather_rows(table, expert_ids, token_ids, check_ids=True):
    """table[expert_ids[t], token_ids[t]] -> [T, H]: each token's embedding row in its expert."""
    if table.dim() != 3:
        raise ValueError(f"table must be [E, V, H], got shape {tuple(table.shape)}")
    if expert_ids.dim() != 1:
        raise ValueError(f"expert_ids must be [T], got shape {tuple(expert_ids.shape)}")
    num_experts, vocab, _ = table.shape
    num_tokens = expert_ids.shape[0]
    _check_ids("expert_ids", expert_ids, num_tokens, num_experts, table.device, check_ids)
    _check_ids("token_ids", token_ids, num_tokens, vocab, table.device, check_ids)
    # One row lookup in the flattened table (3x faster than two-index gathering on the CPU). An
    # unchecked token id outside 0..V-1 is sent past the table, so torch's own bounds check
    # stops it instead of it reading a row of the next expert.
    flat = torch.where(
        (token_ids >= 0) & (token_ids < vocab), expert_ids.long() * vocab + token_ids, -1
    )
    return F.embedding(flat, table.reshape(num_experts * vocab, -1))


def gather_vectors(table, expert_ids, check_ids=True):
    """table[expert_ids[t]] -> [T, H]: each token's copy of a per-expert vector (a norm weight)."""
    if table.dim() != 2:
        raise ValueError(f"table must be [E, H], got shape {tuple(table.shape)}")
    if expert_ids.dim() != 1:
        raise ValueError(f"expert_ids must be [T], got shape {tuple(expert_ids.shape)}")
    _check_ids(
        "expert_ids", expert_ids, expert_ids.shape[0], table.shape[0], table.device, check_ids
    )
    return F.embedding(expert_ids, table)
