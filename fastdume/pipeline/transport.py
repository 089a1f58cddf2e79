"""Stage-to-stage messages over torch.distributed point-to-point (gloo, through host memory).

Each tensor travels as two messages (fastdume.ops.wire): the fixed 128-byte header, then the
payload whose size the header announces. The receiver checks the header against what the
schedule expects (sending stage, micro-batch, step, shape, dtype) before it accepts the payload,
and the payload's CRC32C after, so a wrong or damaged message fails loudly, naming the stage and
micro-batch. Receive buffers come from a wire.BufferPool and are reused every step.

CUDA stages (device="cuda" with fastdume._C_cuda built) move activations and gradients through a
DeviceStager: a send encodes on the GPU and queues the copy into pinned memory on a copy stream,
then returns; the message is posted once its copy is done, and at the latest before this stage
blocks on a receive or at flush(), so a peer never waits for a message held back here. A receive
uploads through pinned memory on the other copy stream, which torch's current stream waits for.
CPU stages work exactly as before.
"""

import contextlib
import functools
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as _RawBackend

from fastdume.ops import wire
from fastdume.ops.quant import DEFAULT_BLOCK, FLOAT_DTYPES
from fastdume.ops.stager import DeviceStager, stager_available

ACT, GRAD = 0, 1


class PeerError(RuntimeError):
    """A neighbouring stage failed, went away or did not answer within the timeout."""


def _tag(kind, micro_batch, part):
    return (micro_batch * 2 + kind) * 2 + part


class Channel:
    """Sends and receives the activations and gradients of one stage process.

    device: where this stage computes; "cuda" stages through a DeviceStager when
    fastdume._C_cuda is available. stager: use this one instead (tests pass a host fake)."""

    def __init__(
        self,
        stage,
        rank_of,
        compress="none",
        block=DEFAULT_BLOCK,
        timeout=60.0,
        group=None,
        device="cpu",
        stager=None,
    ):
        if compress not in wire.COMPRESSIONS:
            raise ValueError(f"compress must be one of {wire.COMPRESSIONS}, got {compress!r}")
        self.stage, self.rank_of = stage, rank_of  # rank_of(stage) -> global rank
        self.compress, self.block = compress, block
        self.timeout = timedelta(seconds=float(timeout))
        self.group = group  # None: the default world group; or a raw ProcessGroup object
        self.pool = wire.BufferPool(8)  # receive buffers
        # send buffers: up to one per in-flight micro-batch message before flush()
        self.send_pool = wire.BufferPool(1024)
        # a CUDA stage sends and receives through pinned buffers and copy streams
        if stager is None and torch.device(device).type == "cuda" and stager_available():
            stager = DeviceStager(max_buffers=1024, device=device)
        self.stager = stager
        self.staged = []  # sends whose copy to the host may still run: (DevicePack, to, kind, mb)
        self.pending = []  # outstanding sends: (work, tensor kept alive, give its buffer back)
        self.bytes_sent = 0

    def send(self, tensor, to_stage, kind, micro_batch, step):
        tensor = tensor.detach()
        meta = dict(step=step, micro_batch=micro_batch, stage=self.stage, compress=self.compress)
        if self.stager is not None:
            msg = wire.pack_device(tensor, self.stager, block=self.block, **meta)
            self.staged.append((msg, to_stage, kind, micro_batch))
            self._post_staged(wait=False)
            return
        buf_id, out = None, None
        if self.compress == "int8" and tensor.dtype in FLOAT_DTYPES:
            # compressed payloads are built in pooled buffers, returned at flush()
            buf_id, out = self.send_pool.acquire(
                wire.payload_nbytes(tensor, self.compress, self.block)
            )
        header, payload = wire.pack(tensor, block=self.block, out=out, **meta)
        give_back = None if buf_id is None else functools.partial(self.send_pool.release, buf_id)
        self._post(header, payload, to_stage, kind, micro_batch, give_back)

    def _post(self, header, payload, to_stage, kind, micro_batch, give_back):
        dst = self.rank_of(to_stage)
        for part, t in enumerate((header, payload)):
            work = self._isend(t, dst, _tag(kind, micro_batch, part))
            self.pending.append((work, t, give_back if part == 1 else None))
        self.bytes_sent += header.numel() + payload.numel()

    def _post_staged(self, wait):
        """Post the staged sends in order: those whose copy is done, or all when `wait`."""
        while self.staged and (wait or self.staged[0][0].ready()):
            msg, to_stage, kind, micro_batch = self.staged.pop(0)
            header, payload = msg.finish()
            give_back = functools.partial(self.stager.release, msg.buf_id)
            self._post(header, payload, to_stage, kind, micro_batch, give_back)

    def _isend(self, t, dst, tag):
        with self._peer_errors(f"posting a send to rank {dst}"):
            if isinstance(self.group, _RawBackend):
                return self.group.send([t], dst, tag)
            return dist.isend(t, dst, group=self.group, tag=tag)

    def _irecv(self, t, src, tag):
        with self._peer_errors(f"posting a receive from rank {src}"):
            if isinstance(self.group, _RawBackend):
                return self.group.recv([t], src, tag)
            return dist.irecv(t, src, group=self.group, tag=tag)

    def _wait(self, work, what):
        with self._peer_errors(what):
            work.wait(self.timeout)

    @contextlib.contextmanager
    def _peer_errors(self, what):
        # gloo raises RuntimeError for timeouts and closed peers, when an operation is waited
        # on and already when it is posted to a peer that has died
        try:
            yield
        except Exception as exc:
            raise PeerError(f"stage {self.stage}: {what} failed: {exc}") from exc

    def recv(self, from_stage, kind, micro_batch, step, shape, dtype, device="cpu"):
        self._post_staged(wait=True)  # before blocking: the peer may be waiting for them
        where = wire.who(from_stage, micro_batch, step)
        what = "activations" if kind == ACT else "gradients"
        src = self.rank_of(from_stage)
        header = torch.empty(wire.HEADER_BYTES, dtype=torch.uint8)
        work = self._irecv(header, src, _tag(kind, micro_batch, 0))
        self._wait(work, f"receiving {what} header from {where}")
        info = wire.read_header(header, where)
        wire.check_header(
            info,
            where,
            stage=from_stage,
            micro_batch=micro_batch,
            step=step,
            shape=shape,
            dtype=dtype,
        )
        nbytes = int(info["payload_bytes"])
        buf_id, payload = self.pool.acquire(nbytes)
        try:
            work = self._irecv(payload, src, _tag(kind, micro_batch, 1))
            self._wait(work, f"receiving {what} from {where}")
            return wire.decode(info, payload, where=where, device=device, stager=self.stager)
        finally:
            self.pool.release(buf_id)

    def flush(self):
        """Post what is staged, wait for every outstanding send (end of step: buffers may be
        reused after this) and recycle the stager's buffers and events."""
        self._post_staged(wait=True)
        pending, self.pending = self.pending, []
        for work, _, give_back in pending:
            self._wait(work, "sending")
            if give_back is not None:
                give_back()
        if self.stager is not None:
            self.stager.reset()
