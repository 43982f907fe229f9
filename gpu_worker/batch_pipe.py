"""The engine process's Batches to the server, over a pipe, with no thread of the engine's in the way.

BatchWriter (the engine's end) is called by the step loop itself. A Batch is written at once unless the server is
far behind (MERGE_AFTER_BYTES unread in the pipe, FIONREAD: ~20 steps of 64 streamed tokens); then it merges
into the one that waits (the server gets fewer, larger Batches to decode and apply), written once the server
has caught up or when the loop is about to wait (`flush`). Not merged sooner: a Batch held at the end of a step
waits for the next step's end, and a prompt's step can be long. Writes never block: a frame larger than the pipe
has room for leaves its rest in a backlog that a thread writes as the pipe drains; that thread sleeps until then.

Why not a sender thread for every Batch (what this replaced): the step loop releases the GIL in every torch call,
and a thread that wakes each step to pickle and write takes it there; the loop then waits to get it back. On an H200
the served worker's launch phase (ModelRunner.run) was 0.88-1.19 ms against 0.571 in the closed loop, and a shorter
GIL switch interval shrank it. Stubbed engine on the 2-core dev VM, 64 streams, engine process pinned to a CPU of its
own (benchmarks.served_host --pin-engine, the code before and after side by side): the launch phase shorter by
0.09-0.36 ms in each of 9 pairs (e.g. 0.80-0.83 -> 0.56-0.61 ms; alone it is 0.55).

BatchReader (the server's end) reads what the pipe holds without blocking (the event loop calls it when the fd is
readable) and returns the whole Batches; a frame split across reads waits for its rest.

A frame: an 8-byte little-endian length, then the Batch in MessagePack (ipc_codec.py: no pickle).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import termios
import threading

from gpu_worker import ipc_codec
from gpu_worker.engine_core import Batch

HEADER = struct.Struct("<Q")
# Asked of the kernel for the pipe (Linux's default is 64 KiB; unprivileged processes may go to
# /proc/sys/fs/pipe-max-size, 1 MiB by default): a Batch of 64 streamed tokens is ~3 KB, a final output with a
# long prompt and logprobs can be hundreds of KB.
PIPE_BYTES = 1 << 20
MERGE_AFTER_BYTES = 64 << 10
READ_BYTES = 1 << 20


def _unread(fd: int) -> int:
    """Bytes written to the pipe and not read yet (0 where the platform cannot tell: the Batch is written)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _widen(fd: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


class BatchWriter:
    def __init__(self, fd: int, merge_after: int = MERGE_AFTER_BYTES):
        self._fd = fd
        self._merge_after = merge_after
        os.set_blocking(fd, False)
        _widen(fd)
        self._pending: Batch | None = None  # merged while the server is far behind
        self._backlog = bytearray()  # the rest of a frame the pipe had no room for
        self._cv = threading.Condition()
        self._closed = False  # the server is gone (or join() ended): nothing more is written
        self._thread = threading.Thread(target=self._drain, name="engine-batches-backlog", daemon=True)
        self._thread.start()

    def __call__(self, batch: Batch) -> None:
        """Hands a Batch over without waiting. A stopped Batch (the last) is written at once."""
        self._pending = batch if self._pending is None else self._pending.merge(batch)
        self.flush(force=batch.stopped)

    def flush(self, force: bool = True) -> None:
        """Writes the Batch that waits: unless the server is far behind, or whatever the pipe holds when `force`
        (the step loop is about to wait: a Batch held now would wait with it)."""
        if self._pending is None or not (force or _unread(self._fd) < self._merge_after):
            return
        data = ipc_codec.encode(self._pending)
        self._pending = None
        frame = HEADER.pack(len(data)) + data
        with self._cv:
            if self._closed:
                return
            if self._backlog:  # behind the backlog, in order
                self._backlog += frame
                return
            written = self._write(frame)
            if written < len(frame):
                self._backlog += memoryview(frame)[written:]
                self._cv.notify_all()

    def _write(self, data) -> int:
        """Bytes written without blocking (all of them when the server is gone: they are dropped)."""
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError:  # the server is gone
            self._closed = True
            self._backlog.clear()
            self._cv.notify_all()
            return len(data)

    def _drain(self) -> None:
        writable = select.poll()
        writable.register(self._fd, select.POLLOUT)
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._backlog or self._closed)
                if self._closed:
                    return
            writable.poll()  # until the server has read some (the GIL is released here)
            with self._cv:
                del self._backlog[:self._write(self._backlog)]
                if not self._backlog:
                    self._cv.notify_all()

    def join(self, timeout: float | None = None) -> None:
        """Waits until everything handed over is written (or the server is gone), then stops the backlog's
        thread; the fd stays open (its owner closes it)."""
        self.flush()
        with self._cv:
            self._cv.wait_for(lambda: not self._backlog or self._closed, timeout)
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)


class BatchReader:
    def __init__(self, fd: int):
        self._fd = fd
        os.set_blocking(fd, False)
        self._buffer = bytearray()
        self.eof = False  # the writer's end is closed (the engine process is gone, or ended)

    def read(self) -> list[Batch]:
        """The whole Batches the pipe holds now, in order; sets `eof` when the writer's end is closed, and raises
        BrokenPipeError (setting `eof`) at a frame that does not decode."""
        while not self.eof:
            try:
                chunk = os.read(self._fd, READ_BYTES)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
            self._buffer += chunk
        batches, at, buf = [], 0, self._buffer
        with memoryview(buf) as view:
            while len(buf) - at >= HEADER.size:
                (n,) = HEADER.unpack_from(buf, at)
                start = at + HEADER.size
                if len(buf) - start < n:
                    break
                try:
                    batches.append(ipc_codec.decode(view[start:start + n]))
                except ValueError as e:  # (MessagePack's and ipc_codec's refusals): nothing after it can be trusted
                    self.eof = True
                    raise BrokenPipeError(f"the engine process sent a Batch that does not decode: {e}") from e
                at = start + n
        del buf[:at]
        return batches
