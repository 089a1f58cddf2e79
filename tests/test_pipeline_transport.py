"""The pipeline's stage-to-stage channel over a real gloo pair: exact delivery, and wrong or
damaged messages rejected with errors naming the stage and micro-batch."""

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from fastdume.ops import quant, wire
from fastdume.pipeline.schedule import one_f_one_b, schedule
from fastdume.pipeline.transport import ACT, GRAD, Channel, PeerError, _tag


@pytest.fixture
def pair():
    store = dist.HashStore()
    pgs = [None, None]

    def make(rank):
        pgs[rank] = dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=2))

    threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    chans = [Channel(s, lambda s: s, timeout=2, group=pgs[s]) for s in range(2)]
    return pgs, chans


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as exc:  # handed to the test thread
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_channel_delivers_exactly(pair):
    _, (c0, c1) = pair
    for step in range(3):
        x = torch.randn(2, 5, 8)
        c0.send(x, 1, ACT, micro_batch=3, step=step)
        y = c1.recv(0, ACT, 3, step, (2, 5, 8), torch.float32)
        c0.flush()
        assert torch.equal(y, x)
    assert c1.pool.allocations == 1 and c1.pool.reuses == 2  # receive buffer reused
    g = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    c1.send(g, 0, GRAD, micro_batch=0, step=7)
    assert torch.equal(c0.recv(1, GRAD, 0, 7, (2, 5, 8), torch.bfloat16), g)
    c1.flush()


def _send_raw(pg, header, payload, micro_batch, kind=ACT):
    for part, t in enumerate((header, payload)):
        pg.send([t], 1, _tag(kind, micro_batch, part)).wait()


def test_corrupted_payload_names_stage_and_micro_batch(pair):
    pgs, (_, c1) = pair
    x = torch.randn(2, 4, 8)
    header, payload = wire.pack(x, step=1, micro_batch=2, stage=0, compress="int8", block=16)
    payload[5] ^= 0x04  # a bit flipped on the wire
    t, _ = _in_thread(lambda: _send_raw(pgs[0], header, payload, 2))
    with pytest.raises(wire.StreamError, match=r"stage 0 micro-batch 2 \(step 1\).*checksum"):
        c1.recv(0, ACT, 2, 1, (2, 4, 8), torch.float32)
    t.join()


@pytest.mark.parametrize(
    "field,sent,pattern",
    [
        ("step", dict(step=0), "step expected 1, got 0"),
        ("shape", dict(shape=(2, 4, 9)), r"shape expected \(2, 4, 8\), got \(2, 4, 9\)"),
        ("dtype", dict(dtype=torch.float16), "dtype expected torch.float32, got torch.float16"),
    ],
)
def test_mismatched_message_names_stage_and_micro_batch(pair, field, sent, pattern):
    pgs, (_, c1) = pair
    x = torch.randn(*sent.get("shape", (2, 4, 8))).to(sent.get("dtype", torch.float32))
    header, payload = wire.pack(x, step=sent.get("step", 1), micro_batch=2, stage=0)
    t, _ = _in_thread(lambda: _send_raw(pgs[0], header, payload, 2))
    with pytest.raises(wire.StreamError, match=rf"stage 0 micro-batch 2 \(step 1\).*{pattern}"):
        c1.recv(0, ACT, 2, 1, (2, 4, 8), torch.float32)
    t.join(timeout=10)


def test_silent_peer_times_out_with_clear_error(pair):
    _, (_, c1) = pair
    with pytest.raises(PeerError, match=r"stage 1: receiving activations header from stage 0 "):
        c1.recv(0, ACT, 0, 0, (2, 4, 8), torch.float32)


def test_schedules_cover_every_micro_batch_once():
    for S in (1, 2, 4):
        for s in range(S):
            for M in (1, 3, 6):
                for name in ("gpipe", "1f1b"):
                    order = schedule(name, M, s, S)
                    assert sorted(mb for op, mb in order if op == "F") == list(range(M))
                    assert sorted(mb for op, mb in order if op == "B") == list(range(M))
                    seen = set()
                    for op, mb in order:  # a backward only after its own forward
                        if op == "F":
                            seen.add(mb)
                        else:
                            assert mb in seen
    # 1F1B holds at most S - stage activations at once
    order = one_f_one_b(8, 0, 4)
    live = peak = 0
    for op, _ in order:
        live += 1 if op == "F" else -1
        peak = max(peak, live)
    assert peak == 4
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedule("zero-bubble", 2, 0, 2)


def test_int8_channel_reuses_send_and_receive_buffers(pair):
    pgs, _ = pair
    c0, c1 = (
        Channel(s, lambda s: s, compress="int8", block=32, timeout=2, group=pgs[s])
        for s in range(2)
    )
    for step in range(3):
        x = torch.randn(2, 5, 48)
        for mb in range(2):
            c0.send(x * (mb + 1), 1, ACT, micro_batch=mb, step=step)
        for mb in range(2):
            y = c1.recv(0, ACT, mb, step, (2, 5, 48), torch.float32)
            ref = quant.dequantize_reference(
                *quant.quantize_reference(x * (mb + 1), 32), x.shape, x.dtype, 32
            )
            torch.testing.assert_close(y, ref, rtol=0, atol=0)
        c0.flush()
    assert c0.send_pool.allocations == 2 and c0.send_pool.reuses == 4
    assert c1.pool.allocations == 1


def test_each_received_header_is_parsed_once(pair, monkeypatch):
    import fastdume._C as ext

    calls = []
    parse = ext.parse_header
    monkeypatch.setattr(ext, "parse_header", lambda *a: calls.append(a) or parse(*a))
    _, (c0, c1) = pair
    x = torch.randn(2, 5, 8)
    c0.send(x, 1, ACT, micro_batch=0, step=0)
    assert torch.equal(c1.recv(0, ACT, 0, 0, (2, 5, 8), torch.float32), x)
    c0.flush()
    assert len(calls) == 1


def _staged_pair(pgs, compress):
    # the CUDA stages' path (encode, copy to pinned memory on a copy stream, post once copied,
    # upload on receipt) with host fakes of the copy engine and pinned pool
    from _stager_fakes import fake_stager

    return [
        Channel(s, lambda s: s, compress, 32, timeout=2, group=pgs[s], stager=fake_stager(64))
        for s in range(2)
    ]


@pytest.mark.parametrize("compress", ["none", "int8"])
def test_staged_channel_posts_before_it_blocks_and_delivers(pair, compress):
    pgs, _ = pair
    c0, c1 = _staged_pair(pgs, compress)
    codec = (lambda t: t) if compress == "none" else _int8_roundtrip
    for step in range(2):
        acts = [torch.randn(2, 5, 48) for _ in range(2)]
        grads = [torch.randn(2, 5, 48) for _ in range(2)]
        for mb, a in enumerate(acts):
            c0.send(a, 1, ACT, micro_batch=mb, step=step)
        # copies not done: nothing on the wire yet, the sources are held
        assert len(c0.staged) == 2 and c0.pending == [] and len(c0.stager.held) == 2

        def stage1(step=step, grads=grads):
            got = []
            for mb in range(2):
                got.append(c1.recv(0, ACT, mb, step, (2, 5, 48), torch.float32))
                c1.send(grads[mb], 0, GRAD, micro_batch=mb, step=step)
            c1.flush()
            return got

        t, out = _in_thread(stage1)
        # stage 0 blocks on a gradient while its activations are still staged: it must post them
        # first, or both stages wait for each other until the timeout
        for mb in range(2):
            g = c0.recv(1, GRAD, mb, step, (2, 5, 48), torch.float32)
            torch.testing.assert_close(g, codec(grads[mb]), rtol=0, atol=0)
        t.join(timeout=10)
        assert "error" not in out, out.get("error")
        for a, y in zip(acts, out["value"], strict=True):
            torch.testing.assert_close(y, codec(a), rtol=0, atol=0)
        c0.flush()
        for c in (c0, c1):  # flush gave every pinned buffer back and dropped every tensor
            assert c.stager.pool.busy() == [] and c.stager.held == [] and c.staged == []
    # two sends in flight and one upload at a time, and the same buffers again the next step
    assert len(c0.stager.pool) == 3 and c0.stager.pool.allocations == 3


def _int8_roundtrip(t):
    return quant.dequantize_reference(*quant.quantize_reference(t, 32), t.shape, t.dtype, 32)


def test_staged_send_is_posted_as_soon_as_its_copy_is_done(pair):
    pgs, _ = pair
    c0, c1 = _staged_pair(pgs, "none")
    x = torch.randn(4, 8)
    c0.send(x, 1, ACT, micro_batch=0, step=0)
    assert c0.pending == []
    c0.stager.engine.complete_all()  # the copy engine finished in the background
    x1 = torch.randn(4, 8)
    c0.send(x1, 1, ACT, micro_batch=1, step=0)  # any later call posts it
    assert len(c0.pending) == 2 and len(c0.staged) == 1
    assert torch.equal(c1.recv(0, ACT, 0, 0, (4, 8), torch.float32), x)
    t, out = _in_thread(lambda: c1.recv(0, ACT, 1, 0, (4, 8), torch.float32))
    c0.flush()  # posts the second message after waiting for its copy
    t.join(timeout=10)
    assert torch.equal(out["value"], x1)


@pytest.mark.gpu
@pytest.mark.parametrize("compress", ["none", "int8"])
def test_cuda_channel_stages_through_pinned_memory(pair, compress):
    pgs, _ = pair
    c0, c1 = (
        Channel(s, lambda s: s, compress, 32, timeout=10, group=pgs[s], device="cuda")
        for s in range(2)
    )
    assert c0.stager is not None
    for step in range(3):
        x = torch.randn(2, 5, 48, device="cuda")
        c0.send(x * 3 + 1, 1, ACT, micro_batch=0, step=step)  # queued behind the compute
        y = c1.recv(0, ACT, 0, step, (2, 5, 48), torch.float32, device="cuda")
        c0.flush()
        want = x * 3 + 1 if compress == "none" else _int8_roundtrip((x * 3 + 1).cpu()).cuda()
        assert y.is_cuda
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        c1.flush()
