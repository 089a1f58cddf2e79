"""Small runs of every GPU code path, for compute-sanitizer (memcheck, racecheck) on a device:

    compute-sanitizer --tool memcheck --error-exitcode 9 python benches/sanitize.py
    compute-sanitizer --tool memcheck --error-exitcode 9 --target-processes all \\
        python benches/sanitize.py pipeline

Sections (default: kernels stager channel):
  kernels   one run of every Triton and CUDA kernel; shapes off the block sizes so every masked
            edge is exercised, each result checked against the torch path
  stager    DeviceStager round trips: sources dropped by the caller right after to_host (the
            stager must hold them), uploads used at once by compute, reuse after release/reset
  channel   the pipeline's CUDA transport in one process: two Channels over a gloo pair, int8
            and uncompressed activations and gradients through pinned buffers and copy streams
  pipeline  a real 2-stage CUDA pipeline run (two spawned processes: pass --target-processes
            all); slower, so not in the default set
--cpu runs channel and pipeline on the CPU instead, to check this script without a device.
"""

import sys
import tempfile
import threading
from datetime import timedelta
from pathlib import Path

import torch

from fastdume.ops import gram, moe, quant, ridge

SECTIONS = ("kernels", "stager", "channel", "pipeline")
DEFAULT = ("kernels", "stager", "channel")


def kernels(dev):
    bf16 = torch.bfloat16
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
    codes, scales = quant.quantize(v, 33, backend="cuda")
    back = quant.dequantize(codes, scales, v.shape, torch.float32, 33, backend="cuda")
    assert (back - v).abs().max() <= scales.abs().max()


def stager(dev):
    from fastdume.ops.stager import DeviceStager

    st = DeviceStager(max_buffers=4)
    base = torch.randn(3000, device=dev)
    for step in range(3):
        want = (base * (step + 2)).cpu()
        buf, host, ev = st.to_host(base * (step + 2))  # the only reference: the stager's
        big = torch.randn(1 << 20, device=dev)  # allocations that would reuse its memory
        st.wait_host(ev)
        assert torch.equal(host.view(torch.float32), want)
        odd = base.view(60, 50)[:, ::2]  # a non-contiguous source
        buf2, host2, ev2 = st.to_host(odd)
        up, _ = st.to_device(host, (3000,), torch.float32, dev)
        torch.testing.assert_close(up * 1.0, want.to(dev), rtol=0, atol=0)  # compute waits
        st.wait_host(ev2)
        assert torch.equal(host2.view(torch.float32).view(60, 25), odd.cpu())
        st.release(buf)
        if step == 1:
            st.release(buf2)  # otherwise reset takes it back
        del big
        st.reset()
    assert len(st.pool) <= 4


def _gloo_pair():
    import torch.distributed as dist

    store, pgs = dist.HashStore(), [None, None]

    def make(rank):
        pgs[rank] = dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=60))

    threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return pgs


def channel(dev):
    from fastdume.pipeline.transport import ACT, GRAD, Channel

    pgs = _gloo_pair()
    shape = (2, 24, 72)
    for compress in ("none", "int8"):
        c0, c1 = (
            Channel(s, lambda s: s, compress, 64, timeout=60, group=pgs[s], device=dev)
            for s in range(2)
        )
        assert (c0.stager is not None) == (dev == "cuda")
        for step in range(2):
            acts = [torch.randn(shape, device=dev) * (mb + 1) for mb in range(2)]
            grads = [torch.randn(shape, device=dev) for _ in range(2)]
            got, err = [], []

            def stage1(c1=c1, step=step, grads=grads, got=got, err=err):
                try:
                    for mb in range(2):
                        got.append(c1.recv(0, ACT, mb, step, shape, torch.float32, dev))
                        c1.send(grads[mb] + got[-1] * 0, 0, GRAD, mb, step)
                    c1.flush()
                except Exception as exc:  # reported by the main thread
                    err.append(exc)

            for mb in range(2):
                c0.send(acts[mb] + 0, 1, ACT, mb, step)  # temporaries: only the stager holds them
            t = threading.Thread(target=stage1)
            t.start()
            back = [c0.recv(1, GRAD, mb, step, shape, torch.float32, dev) for mb in range(2)]
            c0.flush()
            t.join()
            assert not err, err
            for sent, recv in zip(acts + grads, got + back, strict=True):
                tol = 0 if compress == "none" else float(sent.abs().max()) / 127
                torch.testing.assert_close(recv, sent, rtol=0, atol=tol)


def pipeline(dev):
    import json

    from fastdume.data import load_tokenizer
    from fastdume.data.tiny import tiny_model
    from fastdume.pipeline.launch import launch
    from fastdume.pipeline.runtime import PipelineConfig

    root = Path(tempfile.mkdtemp(prefix="sanitize_pipeline_"))
    tok = load_tokenizer()
    model = tiny_model("llama", num_hidden_layers=4, vocab_size=len(tok), tie_word_embeddings=True)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"prompt": f"User: what is {a} plus 2?", "response": f" {a + 2}"} for a in range(32)]
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for compress in ("int8", "none"):
        res = launch(
            PipelineConfig(
                model=str(root / "model"),
                data=str(root / "sft.jsonl"),
                out=str(root / compress),
                stages=2,
                micro_batches=2,
                micro_batch_size=2,
                seq_len=24,
                steps=2,
                compress=compress,
                block=64,
                timeout=300,
                device=dev,
                save_model=False,
            )
        )
        losses = torch.tensor(res["losses"])
        assert losses.numel() == 2 and torch.isfinite(losses).all(), res["losses"]


def main(argv):
    cpu = "--cpu" in argv
    names = [a for a in argv if a != "--cpu"] or (["channel", "pipeline"] if cpu else DEFAULT)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {SECTIONS} (and --cpu)")
    if cpu and {"kernels", "stager"} & set(names):
        raise SystemExit("--cpu runs only the channel and pipeline sections")
    dev = "cpu" if cpu else "cuda"
    torch.manual_seed(0)
    for name in names:
        globals()[name](dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        print(f"sanitize: {name} ran and matched its reference", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
