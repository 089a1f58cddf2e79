"""Stage-to-stage messages over torch.distributed point-to-point (gloo on CPU).

Each tensor travels as two messages: the fixed 128-byte header, then the payload whose size the
header announces. The receiver checks the header against what the schedule expects (sending
stage, micro-batch, step, shape, dtype) before it accepts the payload, and the payload's CRC32C
after, so a wrong or damaged message fails loudly, naming the stage and micro-batch.
Receive buffers come from a C++ pool and are reused every step.
"""

from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as _RawBackend

from fastdume.ops import stream
from fastdume.ops._ext import cpu_ext

ACT, GRAD = 0, 1


class PeerError(RuntimeError):
    """A neighbouring stage failed, went away or did not answer within the timeout."""


def _tag(kind, micro_batch, part):
    return (micro_batch * 2 + kind) * 2 + part


class Channel:
    """Sends and receives the activations and gradients of one stage process."""

    def __init__(
        self, stage, rank_of, compress="none", block=stream.DEFAULT_BLOCK, timeout=60.0, group=None
    ):
        if compress not in stream.COMPRESSIONS:
            raise ValueError(f"compress must be one of {stream.COMPRESSIONS}, got {compress!r}")
        self.stage, self.rank_of = stage, rank_of  # rank_of(stage) -> global rank
        self.compress, self.block = compress, block
        self.timeout = timedelta(seconds=float(timeout))
        self.group = group  # None: the default world group; or a raw ProcessGroup object
        self.pool = cpu_ext().BufferPool(8)  # receive buffers
        # send buffers: up to one per in-flight micro-batch message before flush()
        self.send_pool = cpu_ext().BufferPool(1024)
        self.pending = []  # outstanding sends: (work, tensor kept alive, send buffer id)
        self.bytes_sent = 0

    def send(self, tensor, to_stage, kind, micro_batch, step):
        tensor = tensor.detach()
        buf_id, out = None, None
        if self.compress == "int8" and tensor.dtype in stream.FLOAT_DTYPES:
            # compressed payloads are built in pooled buffers, returned at flush()
            buf_id, arr = self.send_pool.acquire(
                stream.payload_nbytes(tensor, self.compress, self.block)
            )
            out = torch.from_numpy(arr)
        header, payload = stream.pack(
            tensor,
            step=step,
            micro_batch=micro_batch,
            stage=self.stage,
            compress=self.compress,
            block=self.block,
            out=out,
        )
        dst = self.rank_of(to_stage)
        for part, t in enumerate((header, payload)):
            work = self._isend(t, dst, _tag(kind, micro_batch, part))
            self.pending.append((work, t, buf_id if part == 1 else None))
        self.bytes_sent += header.numel() + payload.numel()

    def _isend(self, t, dst, tag):
        if isinstance(self.group, _RawBackend):
            return self.group.send([t], dst, tag)
        return dist.isend(t, dst, group=self.group, tag=tag)

    def _irecv(self, t, src, tag):
        if isinstance(self.group, _RawBackend):
            return self.group.recv([t], src, tag)
        return dist.irecv(t, src, group=self.group, tag=tag)

    def _wait(self, work, what):
        try:
            work.wait(self.timeout)
        except Exception as exc:  # gloo raises RuntimeError for timeouts and closed peers
            raise PeerError(f"stage {self.stage}: {what} failed: {exc}") from exc

    def recv(self, from_stage, kind, micro_batch, step, shape, dtype, device="cpu"):
        where = stream.who(from_stage, micro_batch, step)
        what = "activations" if kind == ACT else "gradients"
        src = self.rank_of(from_stage)
        header = torch.empty(stream.HEADER_BYTES, dtype=torch.uint8)
        work = self._irecv(header, src, _tag(kind, micro_batch, 0))
        self._wait(work, f"receiving {what} header from {where}")
        info = stream.read_header(header, where)
        stream.check_header(
            info,
            where,
            stage=from_stage,
            micro_batch=micro_batch,
            step=step,
            shape=shape,
            dtype=dtype,
        )
        nbytes = int(info["payload_bytes"])
        buf_id, arr = self.pool.acquire(nbytes)
        try:
            payload = torch.from_numpy(arr)
            work = self._irecv(payload, src, _tag(kind, micro_batch, 1))
            self._wait(work, f"receiving {what} from {where}")
            return stream.unpack(header, payload, where=where, device=device)
        finally:
            self.pool.release(buf_id)

    def flush(self):
        """Wait for every outstanding send (end of step: buffers may be reused after this)."""
        pending, self.pending = self.pending, []
        for work, _, buf_id in pending:
            self._wait(work, "sending")
            if buf_id is not None:
                self.send_pool.release(buf_id)
