"""EngineCore: the LLMEngine's step loop, driven by commands that are data (Add, Abort, Prefetch, Evict, Stop) and
answering with one Batch a loop iteration: the new load, the commands' results, the requests' outputs.

Messages, not closures, so the loop runs the same on a thread of the server's process or in a process of its own
(engine_link.py), as vLLM V1's EngineCore does: in its own process the step loop has a GIL of its own, and the
gRPC event loop streaming a message a token no longer slows the steps (benchmarks.served_host).

Cold adapters are read and packed off the loop (AdapterStager): a command for one waits, parked, until its read
is done, and the steps go on meanwhile.
"""

from __future__ import annotations

import gc
import logging
import queue
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpu_worker.adapter_stager import AdapterStager
from gpu_worker.engine.errors import AdapterError, EngineError
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.lora_request import LoRARequest
from gpu_worker.engine.outputs import CompletionOutput, DeltaOutput, RequestOutput
from gpu_worker.engine.sampling_params import SamplingParams
from gpu_worker.step_stats import StepStats
from service_kit.lifecycle import freeze_heap

log = logging.getLogger("gpu_worker.async_engine")

# Idle: how long the step loop blocks on its inbox before looking again (it wakes at once on a command).
IDLE_WAIT_S = 1.0
# Busy but the last step returned nothing (a prompt chunk in flight, or nothing schedulable): wait this long for
# a command rather than spin.
STALL_WAIT_S = 0.001
# While nothing but decode steps happen, the load (status) is taken at most this often (~25 us of host time each at
# batch 64: 2-5% of a step's).
LOAD_INTERVAL_S = 0.005
LORA_OFF = "this worker runs without LoRA (started with --no-enable-lora); adapters cannot be served here"

AdapterKey = tuple[str, str]


class UnavailableError(EngineError):
    """The worker takes no such request now (starting, draining or stopped); another worker may."""


# -- what the loop reports ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterResidency:
    name: str
    content_hash: str
    where: str  # "gpu_slot" or "host_memory"
    active_requests: int
    rank: int


@dataclass(frozen=True)
class EngineInfo:
    """What does not change while the engine runs."""

    served_model_name: str
    device: str
    max_model_len: int
    kv_blocks_total: int
    kv_block_size: int
    enable_lora: bool
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    tokenizer: str  # the tokenizer's directory: the server tokenizes prompts itself


@dataclass(frozen=True)
class EngineLoad:
    waiting: int
    running: int
    kv_blocks_free: int
    adapters: tuple[AdapterResidency, ...]
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0


# -- commands (in) --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Add:
    call: int
    request_id: str
    prompt: Any  # {"prompt": text, "prompt_token_ids": ids} or token ids
    params: SamplingParams
    lora: LoRARequest | None
    content_hash: str  # non-empty: must equal the resolved adapter's


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Prefetch:
    call: int
    lora: LoRARequest
    content_hash: str


@dataclass(frozen=True)
class Evict:
    call: int
    name: str
    content_hash: str


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class _Staged:
    """Posted to the inbox by the stager's thread: an adapter's read ended (error None: it is in host memory)."""

    key: tuple[str, str]
    error: BaseException | None


Command = Add | Abort | Prefetch | Evict | Stop


# -- the answer (out) -----------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One loop iteration's news, applied in this order: load (so a caller whose prefetch is done sees it in the
    status), results of calls, outputs, failed requests. `ready` comes once, first: the engine's info, or the
    error that kept it from starting. `stopped`: the loop has ended (nothing follows); `died`: it ended without
    a Stop (the engine process exited), and why."""

    load: EngineLoad | None = None
    results: list[tuple[int, Any, BaseException | None]] = field(default_factory=list)
    outputs: list = field(default_factory=list)  # RequestOutput, or a DeltaOutput tuple (wire form)
    failed: list[tuple[str, BaseException]] = field(default_factory=list)
    ready: EngineInfo | BaseException | None = None
    stopped: bool = False
    died: BaseException | None = None

    def merge(self, later: Batch) -> Batch:
        """The Batch after this one added into it, in place (a reader that fell behind takes both at once: the
        lists grow by what comes, however many Batches merge)."""
        self.load = later.load if later.load is not None else self.load
        self.results.extend(later.results)
        self.outputs.extend(later.outputs)
        self.failed.extend(later.failed)
        self.ready = self.ready if self.ready is not None else later.ready
        self.stopped, self.died = later.stopped, later.died
        return self

    def __bool__(self) -> bool:
        return bool(self.load is not None or self.results or self.outputs or self.failed or self.ready is not None
                    or self.stopped)


def from_wire(item: RequestOutput | DeltaOutput, adapter_key: AdapterKey | None = None) -> RequestOutput:
    """The RequestOutput of an output in its wire form, with the request's adapter key (the Add's result)."""
    if isinstance(item, RequestOutput):
        return item
    rid, text, token_ids, logprobs = item
    # (the tuples ipc_codec reads arrays back as, made lists as the engine's own)
    c = CompletionOutput(0, "", [], delta_text=text, delta_token_ids=list(token_ids), delta_logprobs=list(logprobs))
    return RequestOutput(rid, None, [], [c], finished=False, adapter_key=adapter_key)


def portable(error: BaseException) -> BaseException:
    """An error that crosses a process boundary: ours and the built-in ones as they are, anything else as a
    RuntimeError naming it (ipc_codec rebuilds no other class on the other side)."""
    if isinstance(error, EngineError) or (type(error).__module__ == "builtins" and isinstance(error, Exception)):
        return error
    return RuntimeError(f"{type(error).__name__}: {error}")


# -- the loop -------------------------------------------------------------------------------------------------


class EngineCore:
    """Owns the engine: builds it, then runs the step loop until Stop, reading `inbox` and handing each
    iteration's Batch to `send`. Everything here runs on one thread (the stager's thread posts to the inbox).

    `flush(force)`, where `send` may hold Batches back (batch_pipe.BatchWriter merges them while the server is
    far behind): called at the top of each iteration, `force` when the loop may block next."""

    def __init__(self, factory: Callable[[], LLMEngine], preload: list[LoRARequest], inbox: queue.SimpleQueue,
                 send: Callable[[Batch], None], wire: bool = False, flush: Callable[[bool], None] | None = None):
        self._factory = factory
        self._preload = preload
        self._inbox = inbox
        self._send = send
        self._flush = flush or (lambda force: None)
        self._wire = wire  # outputs and errors in their wire form (another process reads them)
        self._keys: dict[str, AdapterKey | None] = {}  # live requests and their adapters
        self._parked: dict[tuple[str, str], list[Add | Prefetch]] = {}  # commands waiting for an adapter's read
        self._parked_ids: set[str] = set()  # requests whose Add is parked
        self._results: list[tuple[int, Any, BaseException | None]] = []
        self._failed: list[tuple[str, BaseException]] = []
        self._outputs: list = []
        self._ended = False  # a request ended since the load was last taken
        self.engine: LLMEngine | None = None  # built by run(), on the loop's thread
        self.stager: AdapterStager | None = None

    def run(self) -> None:
        try:
            engine = self._factory()
            engine.wire_deltas = self._wire  # streamed outputs in their slim wire form, built so
            for lora in self._preload:
                try:
                    self._resolve(engine, lora, "")
                except AdapterError as e:
                    raise AdapterError(e.kind, f"pre-loaded adapter {lora.lora_name!r} ({lora.lora_path}) cannot be "
                                       f"served: {e}") from None
            info = _info(engine)
            stats = StepStats(log)
            stager = AdapterStager(engine.lora, stats, lambda key, error: self._inbox.put(_Staged(key, error))) \
                if engine.lora is not None else None
        except BaseException as e:  # handed to start('s caller)
            self._send(Batch(ready=self._error(e), stopped=True))
            return
        freeze_heap()  # (the engine's process runs no service lifecycle of its own)
        self._send(Batch(ready=info))
        self.engine, self.stager = engine, stager
        try:
            self._loop(stats)
        except BaseException as e:  # a bug of ours: whatever waits on the loop is told, and the worker stops
            log.exception("the engine's step loop failed")
            self._send(Batch(stopped=True, died=UnavailableError(f"the engine's step loop failed ({e!r}); see the "
                                                                  f"worker's log")))
        finally:
            gc.unfreeze()  # (on a thread of a longer-lived process, its objects are collectable again)
            if stager is not None:
                stager.close()

    def _loop(self, stats: StepStats) -> None:
        engine = self.engine
        last_load, load, load_at, stalled, stopping = None, None, 0.0, False, False
        while not stopping:
            busy = engine.has_unfinished_requests()
            timeout = None if not busy else STALL_WAIT_S if stalled else 0
            self._flush(timeout != 0)
            commands = self._take(timeout)
            t0 = time.perf_counter()
            for cmd in commands:
                if isinstance(cmd, Stop):
                    stopping = True
                else:
                    self._handle(cmd)
            if commands:
                stats.commands(time.perf_counter() - t0)
            stalled = False
            if engine.has_unfinished_requests() and not stopping:
                try:
                    t0 = time.perf_counter()
                    outputs = engine.step()
                    stats.step(time.perf_counter() - t0, len(outputs))
                except Exception as e:  # a failed step must not take the worker down: fail its requests
                    log.exception("engine step failed; failing %d requests", len(self._keys))
                    outputs = []
                    self._fail_all(RuntimeError(f"the engine failed while running the request: {e}"))
                stalled = not outputs and not engine.step_in_flight()
                for out in outputs:
                    self._route(out)
            if stopping:
                self._fail_all(UnavailableError("the worker stopped before the request finished"))
                for cmds in self._parked.values():
                    for cmd in cmds:
                        self._reply(cmd.call, None, UnavailableError("the worker stopped"))
            # The load after anything that may have changed it at once (a command, a request's end), else at most
            # every LOAD_INTERVAL_S: a decode step only moves the free KV blocks a little.
            now = time.monotonic()
            if commands or self._ended or stopping or last_load is None or now - load_at >= LOAD_INTERVAL_S:
                load, load_at, self._ended = _load(engine, self._keys), now, False
            stats.maybe_log(load.waiting, load.running)
            batch = Batch(load=load if load != last_load else None, results=self._results, outputs=self._outputs,
                          failed=self._failed, stopped=stopping)
            last_load = load
            if batch:
                self._results, self._outputs, self._failed = [], [], []
                self._send(batch)

    def _take(self, timeout: float | None) -> list:
        """Every queued command; when idle (timeout None) block up to IDLE_WAIT_S for the first one."""
        try:
            if timeout == 0:
                first = self._inbox.get_nowait()
            else:
                first = self._inbox.get(timeout=IDLE_WAIT_S if timeout is None else timeout)
        except queue.Empty:
            return []
        cmds = [first]
        while True:
            try:
                cmds.append(self._inbox.get_nowait())
            except queue.Empty:
                return cmds

    # -- commands ---------------------------------------------------------------------------------------------

    def _handle(self, cmd) -> None:
        if isinstance(cmd, Abort):
            self._abort(cmd.request_id)
        elif isinstance(cmd, _Staged):
            for parked in self._parked.pop(cmd.key, []):
                if cmd.error is not None:
                    self._parked_ids.discard(getattr(parked, "request_id", None))
                    self._reply(parked.call, None, cmd.error)
                else:
                    self._run(parked)
        elif isinstance(cmd, (Add, Prefetch)) and cmd.lora is not None and self._must_wait(cmd):
            self._parked.setdefault((cmd.lora.lora_name, cmd.lora.lora_path), []).append(cmd)
            if isinstance(cmd, Add):
                self._parked_ids.add(cmd.request_id)
        else:
            self._run(cmd)

    def _must_wait(self, cmd: Add | Prefetch) -> bool:
        """Whether the adapter is being read (the command waits for it); starts the read if it is cold."""
        if self.stager is None:
            return False
        key = (cmd.lora.lora_name, cmd.lora.lora_path)
        return key in self._parked or not self.stager.stage(cmd.lora)

    def _run(self, cmd: Add | Prefetch | Evict) -> None:
        engine = self.engine
        try:
            if isinstance(cmd, Add):
                self._parked_ids.discard(cmd.request_id)
                key = self._resolve(engine, cmd.lora, cmd.content_hash) if cmd.lora is not None else None
                engine.add_request(cmd.request_id, cmd.prompt, cmd.params, cmd.lora)
                self._keys[cmd.request_id] = key
                result = key
            elif isinstance(cmd, Prefetch):
                result = self._residency_of(engine, self._resolve(engine, cmd.lora, cmd.content_hash))
            else:
                result = engine.lora.evict(cmd.name, cmd.content_hash or None) if engine.lora else 0
        except Exception as e:  # the caller's error: add_request, resolve, ...
            self._reply(cmd.call, None, e)
            return
        self._reply(cmd.call, result, None)

    def _abort(self, request_id: str) -> None:
        if request_id in self._parked_ids:  # its adapter is still being read: the Add is dropped (the read goes on)
            self._parked_ids.discard(request_id)
            for cmds in self._parked.values():
                for c in [c for c in cmds if isinstance(c, Add) and c.request_id == request_id]:
                    cmds.remove(c)
                    self._reply(c.call, None, UnavailableError("the request was cancelled before it started"))
            return
        self.engine.abort_request(request_id)
        self._keys.pop(request_id, None)

    def _reply(self, call: int, result: Any, error: BaseException | None) -> None:
        self._results.append((call, result, None if error is None else self._error(error)))

    def _error(self, error: BaseException) -> BaseException:
        return portable(error) if self._wire else error

    # -- outputs ----------------------------------------------------------------------------------------------

    def _route(self, out: RequestOutput | DeltaOutput) -> None:
        delta = type(out) is tuple  # (the engine's wire_deltas: a streamed output before the last)
        if (out[0] if delta else out.request_id) not in self._keys:
            return
        if not delta and out.finished:
            del self._keys[out.request_id]
            self._ended = True
        self._outputs.append(out)

    def _fail_all(self, error: Exception) -> None:
        self._ended = True
        for rid in list(self._keys):
            self._failed.append((rid, self._error(error)))
            try:
                self._abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
                self._keys.pop(rid, None)

    # -- adapters ---------------------------------------------------------------------------------------------

    @staticmethod
    def _resolve(engine: LLMEngine, lora: LoRARequest, content_hash: str) -> AdapterKey:
        if engine.lora is None:
            raise AdapterError("unsupported", LORA_OFF)
        key = engine.lora.resolve(lora)
        if content_hash and key[1] != content_hash:
            raise AdapterError("mismatch", f"adapter {lora.lora_name!r} version mismatch: requested {content_hash}, "
                               f"have {key[1]}; resolve the adapter again and retry")
        return key

    def _residency_of(self, engine: LLMEngine, key: AdapterKey) -> AdapterResidency:
        for r in _load(engine, self._keys).adapters:
            if (r.name, r.content_hash) == key:
                return r
        return AdapterResidency(key[0], key[1], "host_memory", 0, 0)


def _info(engine: LLMEngine) -> EngineInfo:
    args, device = engine.args, engine.device
    if device.type == "cuda" and device.index is None:
        import torch

        device = torch.device("cuda", torch.cuda.current_device())
    stats = engine.stats()
    return EngineInfo(
        served_model_name=engine.served_model_name,
        device=str(device),
        max_model_len=engine.max_model_len,
        kv_blocks_total=stats["kv_blocks_total"],
        kv_block_size=stats["kv_block_size"],
        enable_lora=engine.lora is not None,
        max_loras=args.max_loras if engine.lora else 0,
        max_cpu_loras=args.max_cpu_loras if engine.lora else 0,
        max_lora_rank=args.max_lora_rank if engine.lora else 0,
        tokenizer=str(args.tokenizer or args.model),
    )


def _load(engine: LLMEngine, keys: dict[str, AdapterKey | None]) -> EngineLoad:
    stats = engine.stats()
    active = Counter(k for k in keys.values() if k is not None)
    adapters = tuple(
        AdapterResidency(r.key[0], r.key[1], r.where, max(r.in_use, active[r.key]), r.rank) for r in stats["adapters"]
    )
    return EngineLoad(stats["waiting"], stats["running"], stats["kv_blocks_free"], adapters,
                      stats["prefix_cache_queried_tokens"], stats["prefix_cache_hit_tokens"])

