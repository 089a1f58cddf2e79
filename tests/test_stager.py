"""The DeviceStager: its lifetime rules checked on the CPU with host fakes of the copy engine and
pinned pool, and the real copy streams on a GPU."""

import gc
import weakref

import pytest
import torch
from _stager_fakes import fake_stager

from fastdume.ops.stager import DeviceStager


def test_copy_engine_reports_no_device_instead_of_crashing():
    from fastdume.ops._ext import cuda_ext

    ext = cuda_ext()
    if ext is None:
        pytest.skip("fastdume._C_cuda not built (no nvcc at install time)")
    if torch.cuda.is_available():
        pytest.skip("a device is present")
    info = ext.device_query()
    assert info["available"] is False and info["reason"].startswith("no device")
    for call in (
        lambda: ext.CopyEngine(),
        lambda: ext.PinnedPool(2),
    ):
        with pytest.raises(RuntimeError, match="no device"):
            call()
    with pytest.raises(RuntimeError, match="DeviceStager needs fastdume._C_cuda and a device"):
        DeviceStager()


@pytest.mark.gpu
def test_device_stager_orders_copies_after_compute():
    stager = DeviceStager()
    x = torch.randn(1 << 20, device="cuda")
    for _ in range(3):
        y = x * 2 + 1  # queued on the compute stream; the copy must see its result
        buf, host, ev = stager.to_host(y)
        stager.wait_host(ev)
        torch.testing.assert_close(host.view(torch.float32), (x * 2 + 1).cpu(), rtol=0, atol=0)
        up, _ = stager.to_device(host, y.shape, torch.float32, "cuda")
        z = up - 1  # compute waits for the upload on the GPU
        torch.testing.assert_close(z, y - 1, rtol=0, atol=0)
        stager.release(buf)
        stager.reset()
    assert len(stager.pool) <= 2  # pinned buffers were reused


# ---- the lifetime rules, on the CPU with host fakes (tests/_stager_fakes.py) ----


def _alive(ref):
    gc.collect()
    return ref() is not None


def test_sources_are_held_until_their_copy_completes():
    st = fake_stager()
    a, b = torch.randn(1000), torch.randn(300)
    want_a, want_b = a.clone(), b.clone()
    buf_a, host_a, ev_a = st.to_host(a)
    buf_b, host_b, ev_b = st.to_host(b)
    ref_a, ref_b = weakref.ref(a), weakref.ref(b)
    del a, b  # the caller lets go at once, as the pipeline does with a sent activation
    assert _alive(ref_a) and _alive(ref_b) and not st.done(ev_a) and not st.done(ev_b)
    st.engine.complete(ev_b.id)  # copies may finish out of order
    st.poll()
    assert not _alive(ref_b) and _alive(ref_a)  # only the finished copy's source is dropped
    assert torch.equal(host_b.view(torch.float32), want_b)
    st.wait_host(ev_a)
    assert not _alive(ref_a) and st.held == []
    assert torch.equal(host_a.view(torch.float32), want_a)


def test_download_buffer_is_reused_only_after_release():
    st = fake_stager()
    x = torch.randn(64, 3)
    buf, host, ev = st.to_host(x)
    with pytest.raises(RuntimeError, match=f"copy into pinned buffer {buf} has not completed"):
        st.release(buf)
    assert st.pool.busy() == [buf]  # the refused release left it with the caller
    st.wait_host(ev)
    assert torch.equal(host.view(torch.float32).view(64, 3), x)
    buf2, _, ev2 = st.to_host(torch.randn(10))  # the first is still the caller's: a new buffer
    assert buf2 != buf and len(st.pool) == 2
    st.release(buf)
    st.wait_host(ev2)
    st.release(buf2)
    buf3, _, _ = st.to_host(torch.randn(64, 3))
    assert buf3 == buf and len(st.pool) == 2  # the released buffer that fits is handed out
    with pytest.raises(ValueError, match=f"pinned buffer {buf2} is not a to_host buffer in use"):
        st.release(buf2)  # released twice


def test_upload_copies_host_bytes_at_once_and_frees_its_buffer_on_completion():
    st = fake_stager(lazy_uploads=True)
    x = torch.randn(5, 7, dtype=torch.bfloat16)
    host = x.view(torch.uint8).reshape(-1).clone()
    out, ev = st.to_device(host, (5, 7), torch.bfloat16, "cpu")
    host.fill_(0)  # the caller may reuse its buffer as soon as to_device returns
    assert ev.id in st.engine.stream_waits  # torch's stream waits for the upload, on the GPU
    (busy,) = st.pool.busy()
    st.poll()
    assert st.pool.busy() == [busy]  # still uploading: the pinned buffer stays taken
    st.engine.complete(ev.id)
    assert torch.equal(out, x)
    st.poll()
    assert st.pool.busy() == [] and st.done(ev)


def test_poll_frees_finished_uploads_before_the_pool_runs_out():
    st = fake_stager(max_buffers=2, lazy_uploads=True)
    host = torch.randint(0, 256, (400,), dtype=torch.uint8)
    _, ev0 = st.to_device(host, (400,), torch.uint8, "cpu")
    _, ev1 = st.to_device(host, (400,), torch.uint8, "cpu")
    with pytest.raises(RuntimeError, match="pinned pool exhausted"):
        st.to_device(host, (400,), torch.uint8, "cpu")
    st.engine.complete(ev0.id)
    out, _ = st.to_device(host, (400,), torch.uint8, "cpu")  # reuses the finished one's buffer
    assert len(st.pool) == 2 and st.pool.allocations == 2
    # the destination of the unfinished upload is held although the caller dropped it
    assert len(st.held) == 2 and any(t is out for t in st.held)
    st.reset()
    assert torch.equal(out, host)


def test_reset_frees_everything_and_invalidates_old_events():
    st = fake_stager(lazy_uploads=True)
    x = torch.randn(100)
    ref = weakref.ref(x)
    buf, host, ev = st.to_host(x)
    del x
    _, up = st.to_device(torch.zeros(12, dtype=torch.uint8), (3,), torch.float32, "cpu")
    assert len(st.pool.busy()) == 2
    st.reset()
    assert st.engine.resets == 1 and st.engine.pending == {}  # reset waited for every copy
    assert st.pool.busy() == [] and st.held == [] and not _alive(ref)
    for stale in (ev, up):
        with pytest.raises(ValueError, match="from before reset"):
            st.wait_host(stale)
    with pytest.raises(ValueError, match="not a to_host buffer in use"):
        st.release(buf)  # reset already took it back
    buf2, _, ev2 = st.to_host(torch.randn(100))  # event ids restart; the new handle is valid
    st.wait_host(ev2)
    st.release(buf2)


def test_misuse_names_the_argument():
    st = fake_stager()
    host = torch.zeros(10, dtype=torch.uint8)
    with pytest.raises(
        ValueError, match=r"host must hold 12 bytes for \(3,\) torch.float32, got 10"
    ):
        st.to_device(host, (3,), torch.float32, "cpu")
    with pytest.raises(ValueError, match="host must be a uint8 CPU tensor, got torch.float32"):
        st.to_device(torch.zeros(3), (3,), torch.float32, "cpu")
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        st.to_host([1, 2])
    with pytest.raises(TypeError, match="event must be a CopyEvent from this stager, got int"):
        st.wait_host(0)
    with pytest.raises(ValueError, match="pass both engine and pool, or neither"):
        DeviceStager(engine=st.engine)
    assert st.pool.busy() == []  # nothing was left half taken
