"""One small run of every GPU kernel, for compute-sanitizer (memcheck, racecheck) on a device:

    compute-sanitizer --tool memcheck python benches/sanitize.py

Shapes are off the block sizes so every masked edge is exercised; each result is checked against
the torch path so a kernel that silently skips work fails here too.
"""

import torch

from fastdume.ops import gram, moe, ridge, stream


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

    h = torch.randn(2, 45, 70, device=dev, dtype=bf16)
    g, s = torch.zeros(2, 70, 70, device=dev), torch.zeros(2, 70, device=dev)
    g2, s2 = g.clone(), s.clone()
    gram.gram_accumulate(h, g, s, backend="triton")
    gram.gram_accumulate(h, g2, s2, backend="torch")
    torch.testing.assert_close(g.tril(), g2.tril(), rtol=1e-3, atol=1e-3)

    a = torch.randn(3, 80, 80, device=dev, dtype=torch.float64)
    a = a @ a.mT + 80 * torch.eye(80, device=dev, dtype=torch.float64)
    b = torch.randn(3, 80, 4, device=dev, dtype=torch.float64)
    got = ridge.ridge_solve(a, b, 0.1, backend="triton")
    torch.testing.assert_close(
        got, ridge.ridge_solve(a, b, 0.1, backend="torch"), rtol=1e-6, atol=1e-8
    )

    v = torch.randn(1000, device=dev)
    codes, scales = stream.quantize(v, 33, backend="cuda")
    back = stream.dequantize(codes, scales, v.shape, torch.float32, 33, backend="cuda")
    assert (back - v).abs().max() <= scales.abs().max()
    torch.cuda.synchronize()
    print("sanitize: all kernels ran and matched the torch path")


if __name__ == "__main__":
    main()
