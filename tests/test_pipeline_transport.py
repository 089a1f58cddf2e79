"""The pipeline's stage-to-stage channel over a real gloo pair: exact delivery, and wrong or
damaged messages rejected with errors naming the stage and micro-batch."""

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from fastdume.ops import stream
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
    header, payload = stream.pack(x, step=1, micro_batch=2, stage=0, compress="int8", block=16)
    payload[5] ^= 0x04  # a bit flipped on the wire
    t, _ = _in_thread(lambda: _send_raw(pgs[0], header, payload, 2))
    with pytest.raises(stream.StreamError, match=r"stage 0 micro-batch 2 \(step 1\).*checksum"):
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
    header, payload = stream.pack(x, step=sent.get("step", 1), micro_batch=2, stage=0)
    t, _ = _in_thread(lambda: _send_raw(pgs[0], header, payload, 2))
    with pytest.raises(stream.StreamError, match=rf"stage 0 micro-batch 2 \(step 1\).*{pattern}"):
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
            ref = stream.dequantize_reference(
                *stream.quantize_reference(x * (mb + 1), 32), x.shape, x.dtype, 32
            )
            torch.testing.assert_close(y, ref, rtol=0, atol=0)
        c0.flush()
    assert c0.send_pool.allocations == 2 and c0.send_pool.reuses == 4
    assert c1.pool.allocations == 1
