"""Host stand-ins for fastdume._C_cuda's CopyEngine and PinnedPool, with the same methods and
errors, so the DeviceStager's bookkeeping and the pipeline's staged path run on a CPU.

The fake engine models asynchrony: a copy's bytes move only when the copy completes (the test
calls complete(), or synchronize() / reset() wait for it), so code that reads a buffer before
waiting, or frees a source before its copy ran, sees the wrong bytes. stream_wait(ev) stands
for "later work on the compute stream runs after copy ev": on the host that means finishing the
copy then, unless lazy_uploads (to look at an upload still in flight)."""

import ctypes

import torch


class FakeCopyEngine:
    def __init__(self, lazy_uploads=False):
        self.lazy_uploads = lazy_uploads
        self.pending = {}  # event id -> (dst, src, nbytes)
        self.issued = 0
        self.stream_waits = []
        self.resets = 0

    def copy(self, dst, src, nbytes, to_host, after):
        ev = self.issued
        self.issued += 1
        self.pending[ev] = (dst, src, nbytes)
        return ev

    def complete(self, ev):
        """The copy engine finishes copy `ev` (on a GPU: whenever the hardware gets to it)."""
        dst, src, nbytes = self.pending.pop(ev)
        ctypes.memmove(dst, src, nbytes)

    def complete_all(self):
        for ev in sorted(self.pending):
            self.complete(ev)

    def query(self, ev):
        self._check(ev)
        return ev not in self.pending

    def synchronize(self, ev):
        self._check(ev)
        if ev in self.pending:
            self.complete(ev)

    def stream_wait(self, ev, stream):
        self._check(ev)
        self.stream_waits.append(ev)
        if not self.lazy_uploads and ev in self.pending:
            self.complete(ev)

    def reset(self):
        self.complete_all()
        self.issued = 0
        self.resets += 1

    def _check(self, ev):
        if not 0 <= ev < self.issued:
            raise ValueError(f"unknown copy event {ev}")


class FakePinnedPool:
    def __init__(self, max_buffers=8):
        self.max = max_buffers
        self.bufs = []  # [host tensor, busy]
        self.allocations = 0

    def acquire(self, nbytes):
        free = [i for i, (t, busy) in enumerate(self.bufs) if not busy and t.numel() >= nbytes]
        if free:
            i = min(free, key=lambda i: self.bufs[i][0].numel())
        elif len(self.bufs) >= self.max:
            raise RuntimeError(f"pinned pool exhausted: all {self.max} buffers are in use")
        else:
            # poisoned, so a read of bytes that never arrived shows
            self.bufs.append([torch.full((max(nbytes, 1),), 0xA5, dtype=torch.uint8), False])
            self.allocations += 1
            i = len(self.bufs) - 1
        self.bufs[i][1] = True
        return i, self.bufs[i][0].data_ptr()

    def release(self, i):
        if not (0 <= i < len(self.bufs)) or not self.bufs[i][1]:
            raise ValueError(f"release: pinned buffer {i} is not in use")
        self.bufs[i][1] = False

    def busy(self):
        return [i for i, (_, b) in enumerate(self.bufs) if b]

    def __len__(self):
        return len(self.bufs)


def fake_stager(max_buffers=8, lazy_uploads=False):
    from fastdume.ops.stager import DeviceStager

    return DeviceStager(engine=FakeCopyEngine(lazy_uploads), pool=FakePinnedPool(max_buffers))
