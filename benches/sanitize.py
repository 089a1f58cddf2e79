"""One small run of every GPU kernel, for compute-sanitizer (memcheck, racecheck) on a device:

    compute-sanitizer --tool memcheck python benches/sanitize.py

Shapes are off the block sizes so every masked edge is exercised; each result is checked against
the torch path so a kernel that silently skips work fails here too. The design options the tuners
may pick run too (MoE swap-AB, split-K, fused routing; Gram schedules; the one-program solve and
the graph-replayed blocked solve).
"""

import torch

from fastdume.ops import _backend, gram, moe, moe_configs, ridge, stream

MOE_DESIGNS = [
    {"FUSED_ROUTING": True},
    {"gemm1": {"SWAP_AB": True, "BLOCK_N": 64}, "gemm2": {"SWAP_AB": True, "BLOCK_N": 64}},
    {"gemm2": {"SPLIT_K": 3}},
]
GRAM_SCHEDULES = [{"group_h": 2}, {"split_k": 3, "ordered_split": True}, {"block_n": 128}]


def moe_designs(x, rw, rb, gu, dn, want, top_k):
    kern = _backend.kernels("moe_grouped", x.device)
    base = moe_configs.validate(moe_configs.load_file("default.json")["buckets"][0]["config"], "")
    for design in MOE_DESIGNS:
        cfg = {**base, **{k: {**base[k], **v} if isinstance(v, dict) else v
                          for k, v in design.items()}}  # fmt: skip
        got = kern.forward(x, rw, rb, gu, dn, top_k, 1.0, moe_configs.validate(cfg, "sanitize"))
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def main():
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(37, 72, device=dev, dtype=bf16)
    rw, rb = torch.randn(3, 72, device=dev), torch.randn(3, device=dev)
    gu = torch.randn(3, 2 * 100, 72, device=dev, dtype=bf16) / 9
    dn = torch.randn(3, 72, 100, device=dev, dtype=bf16) / 10
    for k in (1, 2):
        got = moe.fused_moe(x, rw, rb, gu, dn, top_k=k, backend="triton")
        want = moe.fused_moe(x, rw, rb, gu, dn, top_k=k, backend="torch")
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        moe_designs(x, rw, rb, gu, dn, want, k)

    h = torch.randn(2, 45, 70, device=dev, dtype=bf16)
    g, s = torch.zeros(2, 70, 70, device=dev), torch.zeros(2, 70, device=dev)
    g2, s2 = g.clone(), s.clone()
    gram.gram_accumulate(h, g, s, backend="triton")
    gram.gram_accumulate(h, g2, s2, backend="torch")
    torch.testing.assert_close(g.tril(), g2.tril(), rtol=1e-3, atol=1e-3)
    for schedule in GRAM_SCHEDULES:
        g3, s3 = torch.zeros_like(g), torch.zeros_like(s)
        cfg = {"block_h": 128, "block_n": 64, "split_k": 1, "num_warps": 8, "num_stages": 2}
        gram.gram_accumulate_triton(h, g3, s3, config={**cfg, **schedule})
        torch.testing.assert_close(g3.tril(), g2.tril(), rtol=1e-3, atol=1e-3)

    a = torch.randn(3, 80, 80, device=dev, dtype=torch.float64)
    a = a @ a.mT + 80 * torch.eye(80, device=dev, dtype=torch.float64)
    b = torch.randn(3, 80, 4, device=dev, dtype=torch.float64)
    want = ridge.ridge_solve(a, b, 0.1, backend="torch")
    got = ridge.ridge_solve(a, b, 0.1, backend="triton")  # n = 80: one program per matrix
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    for _ in range(3):  # the blocked path: eager, then captured and replayed as a CUDA graph
        got = ridge.ridge_solve_triton(a, b, 0.1, config={"small": False})
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)

    v = torch.randn(1000, device=dev)
    codes, scales = stream.quantize(v, 33, backend="cuda")
    back = stream.dequantize(codes, scales, v.shape, torch.float32, 33, backend="cuda")
    assert (back - v).abs().max() <= scales.abs().max()
    torch.cuda.synchronize()
    print("sanitize: all kernels ran and matched the torch path")


if __name__ == "__main__":
    main()
