"""Where the EngineCore runs, and how commands reach it and its Batches come back to the event loop.

- ThreadLink: a thread of this process. Commands go through a queue; Batches are handed to the event loop as
  they are (no copy). The GIL is shared with the event loop.
- ProcessLink: a process of its own (spawned: CUDA cannot be forked), as vLLM V1 runs its EngineCore. Commands
  and Batches cross two pipes in MessagePack, rebuilt only as the classes they are made of (ipc_codec.py);
  streamed outputs travel in their slim wire form (outputs.DeltaOutput).
  The step loop then has a GIL of its own: the event loop streaming a message a token no longer slows it. The
  step loop writes its Batches itself, never waiting (batch_pipe.py: merged while the server is far
  behind); the event loop reads them itself (add_reader, non-blocking reads: no thread, no GIL hand-off). The
  engine process ignores SIGINT and SIGTERM (the server drains first, then sends Stop) and stops when its
  command pipe closes (the server died).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable

from gpu_worker import ipc_codec
from gpu_worker.batch_pipe import BatchReader, BatchWriter
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.lora_request import LoRARequest
from gpu_worker.engine_core import Batch, EngineCore, Stop, UnavailableError

log = logging.getLogger(__name__)

Apply = Callable[[Batch], None]  # runs on the event loop


class ThreadLink:
    def __init__(self, factory: Callable[[], LLMEngine]):
        self._factory = factory
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, preload: list[LoRARequest], apply: Apply, loop: asyncio.AbstractEventLoop) -> None:
        def deliver(batch: Batch) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(apply, batch)

        core = EngineCore(self._factory, preload, self._inbox, deliver)
        self._thread = threading.Thread(target=core.run, name="engine-step-loop", daemon=True)
        self._thread.start()

    def send(self, command) -> None:
        self._inbox.put(command)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pid(self) -> int:
        return os.getpid()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


class ProcessLink:
    def __init__(self, factory: Callable[[], LLMEngine]):
        """`factory` must pickle (a module-level function or class instance, or a functools.partial of one)."""
        self._factory = factory
        self._proc = None
        self._commands = None
        self._batches = None
        self._lock = threading.Lock()  # commands are sent from the event loop, and from wherever a stream closes
        self._stopping = False

    def start(self, preload: list[LoRARequest], apply: Apply, loop: asyncio.AbstractEventLoop) -> None:
        ctx = mp.get_context("spawn")
        commands_in, self._commands = ctx.Pipe(duplex=False)
        self._batches, batches_out = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=run_engine_process, name="engine-core", daemon=True,
                                 args=(self._factory, preload, commands_in, batches_out,
                                       logging.getLogger().getEffectiveLevel(), sys.getswitchinterval()))
        self._proc.start()
        commands_in.close()  # the child's ends: closed here, so either side sees the other go
        batches_out.close()
        reader = BatchReader(self._batches.fileno())
        loop.add_reader(self._batches.fileno(), self._readable, reader, apply, loop)

    def _readable(self, reader: BatchReader, apply: Apply, loop: asyncio.AbstractEventLoop) -> None:
        """Every Batch the pipe holds now, applied in order (on the event loop)."""
        try:
            batches = reader.read()
        except OSError as e:
            log.error("reading the engine process's Batches: %s", e)
            batches, reader.eof = [], True
        for batch in batches:
            apply(batch)
            if batch.stopped:
                self._close_reader(loop)
                return
        if reader.eof:  # the engine process is gone without a word
            self._close_reader(loop)
            loop.create_task(self._report_death(apply))

    async def _report_death(self, apply: Apply) -> None:
        await asyncio.to_thread(self._proc.join, 5)
        error = UnavailableError(f"the engine process exited unexpectedly (exit code {self._proc.exitcode}); see "
                                 f"the worker's log")
        apply(Batch(stopped=True, died=None if self._stopping else error))

    def _close_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self._batches.fileno())
        self._batches.close()

    def send(self, command) -> None:
        if isinstance(command, Stop):
            self._stopping = True
        try:
            with self._lock:
                self._commands.send_bytes(ipc_codec.encode(command))
        except (OSError, ValueError):  # the pipe is closed: the process has exited
            raise UnavailableError("the engine process is not running") from None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def join(self) -> None:
        if self._proc is not None:
            self._proc.join()
        if self._commands is not None:
            self._commands.close()


def run_engine_process(factory: Callable[[], LLMEngine], preload: list[LoRARequest], commands, batches,
                       log_level: int, switch_interval_s: float) -> None:
    """The engine process's main: the EngineCore's loop, fed from the command pipe, answering on the other."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server drains on these, then stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The server's (WorkerConfig.gil_switch_interval_ms): here the step loop shares the GIL with the adapter
    # stager's thread, which packs for ~100 ms an adapter, and Python's 5 ms would let it hold the loop that long.
    sys.setswitchinterval(switch_interval_s)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        while True:
            try:
                inbox.put(ipc_codec.decode(commands.recv_bytes()))
            except (EOFError, OSError):  # the server is gone: stop
                inbox.put(Stop())
                return
            except ValueError:  # a command that does not decode: its caller would wait forever; the server sees
                # this process exit and ends every stream UNAVAILABLE (the worker then exits 1)
                log.exception("a command from the worker does not decode; the engine process exits")
                os._exit(1)

    threading.Thread(target=read, name="engine-commands", daemon=True).start()
    writer = BatchWriter(batches.fileno())
    EngineCore(factory, preload, inbox, writer, wire=True, flush=writer.flush).run()
    writer.join()
    batches.close()
