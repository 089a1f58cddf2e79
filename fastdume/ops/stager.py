"""Device <-> host copies through reusable pinned buffers on dedicated copy streams (CUDA).

The copy engine (csrc/cuda/stager.cpp) owns two non-blocking streams, one per direction. A copy
first waits, on the GPU, for the work already queued on torch's current stream, so it sees the
result of the kernels that produced its source; an upload makes torch's current stream wait for
it, again on the GPU. Neither the host nor compute blocks on a transfer; only `wait_host` blocks,
when the bytes must reach the wire.

Lifetime rules (who keeps what alive until when):
- to_host(x): the stager holds x (its contiguous copy, if x was not contiguous) until the copy's
  event reports completion, observed by `wait_host`, `poll`, `release` or `reset`. Without that,
  dropping x would hand its memory back to torch's caching allocator, whose next kernel on the
  compute stream could overwrite it while the copy stream still reads it. (No `record_stream`:
  on an H200 with torch 2.11, freeing a tensor recorded on a stream of fastdume's own CUDA
  runtime aborted the process.)
- The pinned buffer of to_host belongs to the caller from then on: read it after `wait_host`,
  give it back with `release(buf_id)`. Releasing it before its copy completed raises instead of
  letting the pool hand it to another copy while the first still writes into it.
- to_device(host, ...): the host bytes are copied into a pinned buffer before it returns, so the
  caller may reuse `host` at once. The stager returns that buffer to the pool when the upload
  completes, and holds the new tensor until then too. (Torch's current stream waits for the
  upload before any later work, so a reuse of that memory by the compute stream would be ordered
  after the copy anyway; holding it keeps one rule for both directions: no memory a copy touches
  goes back to an allocator before the copy is done.)
- Event handles stay valid until `reset`. reset waits for every copy, drops every held tensor,
  returns every buffer to the pool (including to_host buffers not yet released: host views
  handed out before reset must not be used after it) and recycles the event ids; a handle from
  before reset raises. Call it once per step, after the messages of the step have been sent.
One stager serves one thread.
"""

import ctypes
from dataclasses import dataclass

import torch

from fastdume.ops._ext import cuda_ext, cuda_ext_ready


def stager_available():
    """True when fastdume._C_cuda is built and sees a device (DeviceStager() will work)."""
    return cuda_ext_ready()


@dataclass(frozen=True)
class CopyEvent:
    """Handle of one queued copy: valid until the stager's next reset()."""

    id: int
    generation: int


def _host_view(ptr, nbytes):
    if not nbytes:
        return torch.empty(0, dtype=torch.uint8)
    buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)


def _current_stream(device):
    # the handle of torch's current stream, which copies are ordered against; 0 off CUDA
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


class DeviceStager:
    """Pinned buffers, two copy streams and the bookkeeping of the lifetime rules above.

    max_buffers: pinned buffers at most (downloads not yet released plus uploads in flight).
    device: the CUDA device (None: torch's current one).
    engine, pool: a copy engine and pinned pool with the methods of fastdume._C_cuda's
    CopyEngine and PinnedPool; None builds those. Tests pass host fakes to check the bookkeeping
    on a machine without a GPU.
    """

    def __init__(self, max_buffers=8, device=None, *, engine=None, pool=None):
        if (engine is None) != (pool is None):
            raise ValueError("pass both engine and pool, or neither")
        self._cuda = engine is None
        if self._cuda:
            if not cuda_ext_ready():
                ext = cuda_ext()
                reason = ext.device_query()["reason"] if ext is not None else "not built"
                raise RuntimeError(f"DeviceStager needs fastdume._C_cuda and a device: {reason}")
            index = torch.cuda.current_device() if device is None else torch.device(device).index
            index = torch.cuda.current_device() if index is None else index
            engine, pool = cuda_ext().CopyEngine(index), cuda_ext().PinnedPool(max_buffers, index)
        self.engine, self.pool = engine, pool
        self._generation = 0
        self._inflight = {}  # event id -> (tensor held, upload buffer id or None)
        self._downloads = {}  # buffer id -> event id, for to_host buffers the caller owns

    # ---- copies ----

    def to_host(self, x):
        """Queue a D2H copy of CUDA tensor x; returns (buffer id, uint8 host view, CopyEvent)."""
        self._check_tensor(x, "x")
        self.poll()
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        buf_id, ptr = self.pool.acquire(nbytes)
        try:
            ev = self.engine.copy(ptr, x.data_ptr(), nbytes, True, _current_stream(x.device))
        except BaseException:
            self.pool.release(buf_id)
            raise
        self._inflight[ev] = (x, None)
        self._downloads[buf_id] = ev
        return buf_id, _host_view(ptr, nbytes), CopyEvent(ev, self._generation)

    def to_device(self, host, shape, dtype, device):
        """Queue an H2D copy of uint8 host tensor `host` into a new tensor of `shape` and `dtype`
        on `device`; torch's current stream waits for it on the GPU. Returns (tensor, CopyEvent).
        """
        device = torch.device(device)
        if self._cuda and device.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {device}")
        if not isinstance(host, torch.Tensor) or host.dtype != torch.uint8 or host.is_cuda:
            raise ValueError(f"host must be a uint8 CPU tensor, got {_describe(host)}")
        out = torch.empty(shape, dtype=dtype, device=device)
        nbytes = out.numel() * out.element_size()
        if host.numel() != nbytes:
            raise ValueError(
                f"host must hold {nbytes} bytes for {tuple(shape)} {dtype}, got {host.numel()}"
            )
        self.poll()
        buf_id, ptr = self.pool.acquire(nbytes)
        try:
            _host_view(ptr, nbytes).copy_(host.reshape(-1))
            stream = _current_stream(device)
            ev = self.engine.copy(out.data_ptr(), ptr, nbytes, False, stream)
            self.engine.stream_wait(ev, stream)
        except BaseException:
            self.pool.release(buf_id)
            raise
        self._inflight[ev] = (out, buf_id)
        return out, CopyEvent(ev, self._generation)

    # ---- completion ----

    def done(self, event):
        """True once the copy of `event` has completed (does not block)."""
        ev = self._event_id(event)
        if ev not in self._inflight:
            return True
        if self.engine.query(ev):
            self._complete(ev)
            return True
        return False

    def wait_host(self, event):
        """Block this thread until the copy of `event` has completed."""
        ev = self._event_id(event)
        if ev in self._inflight:
            self.engine.synchronize(ev)
            self._complete(ev)

    def poll(self):
        """Drop the tensors and upload buffers of every copy that has completed."""
        for ev in [e for e in self._inflight if self.engine.query(e)]:
            self._complete(ev)

    def release(self, buf_id):
        """Give a to_host buffer back to the pool; its copy must have completed."""
        if buf_id not in self._downloads:
            raise ValueError(
                f"release: pinned buffer {buf_id!r} is not a to_host buffer in use (released "
                "twice, freed by reset(), or never handed out)"
            )
        ev = self._downloads[buf_id]
        if ev in self._inflight:
            if not self.engine.query(ev):
                raise RuntimeError(
                    f"release: the copy into pinned buffer {buf_id} has not completed; call "
                    "wait_host(event) first"
                )
            self._complete(ev)
        del self._downloads[buf_id]
        self.pool.release(buf_id)

    def reset(self):
        """Wait for all copies, drop held tensors, return every buffer to the pool and recycle
        event ids (handles from before become invalid). Call once per step."""
        self.engine.reset()
        uploads = [up for _, up in self._inflight.values() if up is not None]
        for buf_id in uploads + list(self._downloads):
            self.pool.release(buf_id)
        self._inflight, self._downloads = {}, {}
        self._generation += 1

    @property
    def held(self):
        """The tensors (download sources, upload destinations) of copies not yet seen complete."""
        return [t for t, _ in self._inflight.values()]

    # ---- helpers ----

    def _complete(self, ev):
        _, upload = self._inflight.pop(ev)
        if upload is not None:
            self.pool.release(upload)

    def _event_id(self, event):
        if not isinstance(event, CopyEvent):
            raise TypeError(f"event must be a CopyEvent from this stager, got {_describe(event)}")
        if event.generation != self._generation:
            raise ValueError(
                f"event {event.id} is from before reset() (generation {event.generation}, now "
                f"{self._generation}); copy events are valid until the next reset()"
            )
        return event.id

    def _check_tensor(self, t, name):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {_describe(t)}")
        if self._cuda and not t.is_cuda:
            raise ValueError(f"{name} must be on a CUDA device, got {t.device}")


def _describe(obj):
    if isinstance(obj, torch.Tensor):
        return f"{obj.dtype} tensor on {obj.device}"
    return type(obj).__name__
