"""AsyncEngine: the single-threaded LLMEngine behind an asyncio API.

One dedicated thread owns the engine and runs the step loop. Everything that touches the engine (add,
abort, adapter prefetch / evict, status) is a command: a function of the engine put on a thread-safe queue
and run on that thread between two steps, so the engine is never used concurrently. Results go back to
the event loop with one `call_soon_threadsafe` per loop iteration (command results, per-request outputs,
the new status), in that order of publication: status first, so a caller that sees its prefetch done
also sees it in `status()`. When there is no request the thread sleeps on the command queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpu_worker.adapter_stager import AdapterStager
from gpu_worker.engine.chat_template import ChatPrompt
from gpu_worker.engine.errors import AdapterError, EngineError, InvalidRequestError
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.lora_request import LoRARequest
from gpu_worker.engine.outputs import RequestOutput
from gpu_worker.engine.sampling_params import SamplingParams
from gpu_worker.engine.tokenizer import Tokenizer
from gpu_worker.step_stats import StepStats

log = logging.getLogger(__name__)

# Idle: how long the step loop blocks on the command queue before looking again (it wakes at once on a command).
IDLE_WAIT_S = 1.0
# Busy but the last step returned nothing (a prompt chunk in flight, or nothing schedulable): wait this long for
# a command rather than spin.
STALL_WAIT_S = 0.001
# Longer prompts are tokenized on a pool thread with the GIL released (see encode_releasing_gil): with the test
# tokenizer 2 KiB takes 1.4 ms, 1 MiB 1.5 s, and `Tokenizer.encode` holds the GIL throughout, which would stall
# the event loop and the step loop alike.
INLINE_TOKENIZE_CHARS = 2 * 1024
LORA_OFF = "this worker runs without LoRA (started with --no-enable-lora); adapters cannot be served here"

AdapterKey = tuple[str, str]
_STOP = object()


class UnavailableError(EngineError):
    """The worker takes no such request now (starting or draining); another worker may."""


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


@dataclass(frozen=True)
class EngineLoad:
    waiting: int
    running: int
    kv_blocks_free: int
    adapters: tuple[AdapterResidency, ...]
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0


@dataclass(frozen=True)
class EngineStatus:
    state: str  # "starting", "serving", "draining", "stopped"
    info: EngineInfo | None
    load: EngineLoad | None
    version: int


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: the last, its deltas now all of theirs, in order. The last is
    changed in place (each output the engine hands out is a new object, queued for one stream only): on a busy
    event loop, two dataclasses.replace a merge cost 13% of its time (benchmarks.served_host)."""
    last = outputs[-1]
    c = last.outputs[0]
    parts = [o.outputs[0] for o in outputs]
    c.delta_text = "".join(p.delta_text for p in parts)
    c.delta_token_ids = [t for p in parts for t in p.delta_token_ids]
    c.delta_logprobs = [lp for p in parts for lp in p.delta_logprobs]
    return last


class RequestStream:
    """One request's outputs, as they come. `close()` (always call it) aborts the request if unfinished."""

    def __init__(self, owner: AsyncEngine, request_id: str, outputs: asyncio.Queue, adapter_key: AdapterKey | None):
        self._owner = owner
        self.request_id = request_id
        self.adapter_key = adapter_key
        self._outputs = outputs
        self._done = False
        self._closed = False
        self._error: BaseException | None = None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._error is not None:
            error, self._error, self._done = self._error, None, True
            raise error
        if self._done:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        # A reader that fell behind (a busy event loop, a slow client) takes every output already queued as
        # one: fewer, fuller messages exactly when the loop has the least time for them (vLLM's stream
        # interval, adaptive). An error queued behind them is raised on the next call.
        queued = [item]
        while not queued[-1].finished and not self._outputs.empty():
            more = self._outputs.get_nowait()
            if isinstance(more, BaseException):
                self._error = more
                break
            queued.append(more)
        item = merge_outputs(queued) if len(queued) > 1 else item
        self._done = item.finished
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._done:  # the client went away (cancel, deadline) or the server stopped: free its KV blocks
            self._done = True
            self._owner._submit(lambda engine: self._owner._abort(engine, self.request_id))
        self._owner._stream_closed()


class AsyncEngine:
    def __init__(self, engine_factory: Callable[[], LLMEngine]):
        self._factory = engine_factory
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._tokenizer: Tokenizer | None = None
        # Reads cold adapters off the step loop, once the engine exists (none when LoRA is off).
        self._stager: AdapterStager | None = None
        # Owned by the engine thread: where each live request's outputs go, and its adapter.
        self._queues: dict[str, asyncio.Queue] = {}
        self._keys: dict[str, AdapterKey | None] = {}
        # Owned by the event loop.
        self._state = "starting"
        self._info: EngineInfo | None = None
        self._load: EngineLoad | None = None
        self._version = 0
        self._changed = asyncio.Event()
        self._open_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle (event loop) -------------------------------------------------------------------

    async def start(self, preload: list[LoRARequest] = ()) -> EngineInfo:
        """Build the engine on its thread and read every pre-loaded adapter; raises what that raised."""
        self._loop = asyncio.get_running_loop()
        ready = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready, list(preload)), name="engine-step-loop",
                                        daemon=True)
        self._thread.start()
        self._info = await ready
        self._publish_state()
        return self._info

    @property
    def state(self) -> str:
        return self._state

    def set_state(self, state: str) -> None:
        self._state = state
        self._publish_state()

    async def stop(self) -> None:
        """Stop the step loop (requests still running get an error) and wait for the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._commands.put((_STOP, None))
            await asyncio.to_thread(self._thread.join)
        if self._stager is not None:
            self._stager.close()
        self.set_state("stopped")

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request stream is open; False if some still are after `timeout` seconds."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self._idle.is_set()

    # -- requests (event loop) --------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int] | ChatPrompt,
        params: SamplingParams,
        lora_request: LoRARequest | None = None,
        content_hash: str = "",
        request_id: str = "",
    ) -> RequestStream:
        """Queue a request; raises InvalidRequestError, AdapterError or CapacityError as the engine does.
        A non-empty `content_hash` must equal the resolved adapter's, else AdapterError(mismatch)."""
        if self._tokenizer is None:
            raise UnavailableError("the engine is not running yet")
        if isinstance(prompt, ChatPrompt):
            text = self._tokenizer.render_chat(list(prompt.messages), prompt.continue_final_message)
            if len(text) > INLINE_TOKENIZE_CHARS:
                ids = await asyncio.to_thread(self._tokenizer.encode_rendered, text)
            else:
                ids = self._tokenizer.encode_rendered(text)
            prompt = {"prompt": text, "prompt_token_ids": ids}
        elif isinstance(prompt, str):
            # Tokenized here (off the engine thread); the text goes along so the engine checks it as it
            # checks a text prompt (an empty one is refused even though its token ids are a lone BOS).
            text = prompt
            if len(text) > INLINE_TOKENIZE_CHARS:
                ids = await asyncio.to_thread(encode_releasing_gil, self._tokenizer, text)
            else:
                ids = self._tokenizer.encode(text)
            prompt = {"prompt": text, "prompt_token_ids": ids}
        # A served request may not ask for more tokens than its context leaves (as vLLM's server answers
        # 400); offline, the engine stops such a request at max_model_len instead.
        n_prompt = len(prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt)
        limit = self._info.max_model_len if self._info is not None else None
        if limit is not None and n_prompt < limit and n_prompt + params.max_tokens > limit:
            raise InvalidRequestError(f"max_tokens {params.max_tokens} with a prompt of {n_prompt} tokens is over "
                                      f"this model's context of {limit} tokens: ask for at most "
                                      f"{limit - n_prompt} new tokens")
        # Internal ids are unique whatever the client sends: a retry never collides with its own abort.
        rid = f"{request_id or 'req'}#{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        await self._stage_adapter(lora_request)

        def add(engine: LLMEngine) -> AdapterKey | None:
            key = self._resolve(engine, lora_request, content_hash) if lora_request is not None else None
            engine.add_request(rid, prompt, params, lora_request)
            self._queues[rid], self._keys[rid] = outputs, key
            return key

        stream = RequestStream(self, rid, outputs, None)
        self._stream_opened()
        try:
            stream.adapter_key = await self._call(add)
        except BaseException:
            # Refused (nothing held), or cancelled while the add was queued: the abort that close() queues
            # runs after the add on the engine thread and frees whatever it took.
            stream.close()
            raise
        return stream

    async def prefetch(self, lora_request: LoRARequest, content_hash: str = "") -> AdapterResidency:
        """Read the adapter into host memory (idempotent) and say where it now is."""

        def prefetch(engine: LLMEngine) -> AdapterResidency:
            key = self._resolve(engine, lora_request, content_hash)
            return self._residency_of(engine, key)

        await self._stage_adapter(lora_request)
        return await self._call(prefetch)

    async def _stage_adapter(self, lora_request: LoRARequest | None) -> None:
        """Read a cold adapter off the step loop (AdapterStager), so the engine thread only files it."""
        if lora_request is not None and self._stager is not None:
            await self._stager.stage(lora_request)

    async def evict(self, name: str, content_hash: str = "") -> int:
        return await self._call(lambda engine: engine.lora.evict(name, content_hash or None) if engine.lora else 0)

    def status(self) -> EngineStatus:
        return EngineStatus(self._state, self._info, self._load, self._version)

    async def wait_changed(self, version: int) -> int:
        """Return as soon as the status's version differs from `version`."""
        while self._version == version:
            await self._changed.wait()
        return self._version

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    # -- plumbing (event loop) --------------------------------------------------------------------

    def _submit(self, fn: Callable[[LLMEngine], Any], future: asyncio.Future | None = None) -> None:
        self._commands.put((fn, future))

    async def _call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        if self._thread is None or not self._thread.is_alive():
            raise UnavailableError("the engine is not running")
        future = self._loop.create_future()
        self._submit(fn, future)
        return await future

    def _stream_opened(self) -> None:
        self._open_streams += 1
        self._idle.clear()

    def _stream_closed(self) -> None:
        self._open_streams -= 1
        if self._open_streams == 0:
            self._idle.set()

    def _publish_state(self) -> None:
        self._version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _apply(self, posts: list[Callable[[], None]]) -> None:
        for post in posts:
            post()

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self, ready: asyncio.Future, preload: list[LoRARequest]) -> None:
        try:
            engine = self._factory()
            self._tokenizer = Tokenizer(engine.args.tokenizer or engine.args.model)  # ours: used off this thread
            for lora in preload:
                try:
                    self._resolve(engine, lora, "")
                except AdapterError as e:
                    raise AdapterError(e.kind, f"pre-loaded adapter {lora.lora_name!r} ({lora.lora_path}) cannot be "
                                       f"served: {e}") from None
            info = _info(engine)
            stats = StepStats(log)
            self._stager = AdapterStager(engine.lora, stats) if engine.lora is not None else None
        except BaseException as e:  # handed to start('s caller)
            self._post([lambda error=e: ready.done() or ready.set_exception(error)])
            return
        self._post([lambda: ready.done() or ready.set_result(info)])
        last_load, stalled, stopping = None, False, False
        while not stopping:
            busy = engine.has_unfinished_requests()
            posts: list[Callable[[], None]] = []
            commands = self._take(None if not busy else STALL_WAIT_S if stalled else 0)
            t0 = time.perf_counter()
            for fn, future in commands:
                if fn is _STOP:
                    stopping = True
                    continue
                try:
                    posts.append(_resolver(future, fn(engine), None))
                except Exception as e:  # the caller's error: add_request, resolve, ...
                    posts.append(_resolver(future, None, e))
            if commands:
                stats.commands(time.perf_counter() - t0)
            stalled = False
            if engine.has_unfinished_requests() and not stopping:
                try:
                    t0 = time.perf_counter()
                    outputs = engine.step()
                    stats.step(time.perf_counter() - t0, len(outputs))
                except Exception as e:  # a failed step must not take the worker down: fail its requests
                    log.exception("engine step failed; failing %d requests", len(self._queues))
                    outputs = []
                    self._fail_all(engine, posts, RuntimeError(f"the engine failed while running the request: {e}"))
                stalled = not outputs and not engine.step_in_flight()
                for out in outputs:
                    self._route(out, posts)
            if stopping:
                self._fail_all(engine, posts, UnavailableError("the worker stopped before the request finished"))
            load = _load(engine, self._keys)
            stats.maybe_log(load.waiting, load.running)
            if load != last_load:
                last_load = load
                posts.insert(0, lambda load=load: self._set_load(load))
            if posts:
                self._post(posts)

    def _take(self, timeout: float | None) -> list:
        """Every queued command; when idle (timeout None) block up to IDLE_WAIT_S for the first one."""
        try:
            if timeout == 0:
                first = self._commands.get_nowait()
            else:
                first = self._commands.get(timeout=IDLE_WAIT_S if timeout is None else timeout)
        except queue.Empty:
            return []
        cmds = [first]
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _post(self, posts: list[Callable[[], None]]) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._apply, posts)

    def _set_load(self, load: EngineLoad) -> None:
        self._load = load
        self._publish_state()

    def _route(self, out: RequestOutput, posts: list) -> None:
        outputs = self._queues.get(out.request_id)
        if outputs is None:
            return
        if out.finished:
            del self._queues[out.request_id]
            del self._keys[out.request_id]
        posts.append(lambda: outputs.put_nowait(out))

    def _abort(self, engine: LLMEngine, request_id: str) -> None:
        engine.abort_request(request_id)
        self._queues.pop(request_id, None)
        self._keys.pop(request_id, None)

    def _fail_all(self, engine: LLMEngine, posts: list, error: Exception) -> None:
        for rid, outputs in list(self._queues.items()):
            posts.append(lambda outputs=outputs: outputs.put_nowait(error))
            try:
                self._abort(engine, rid)
            except Exception:
                log.exception("abort of %s failed", rid)
                self._queues.pop(rid, None)
                self._keys.pop(rid, None)

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


def encode_releasing_gil(tokenizer: Tokenizer, text: str) -> list[int]:
    """`tokenizer.encode(text)`, through `encode_batch`, which releases the GIL while it works (`encode` does not)."""
    if not isinstance(text, str):
        return tokenizer.encode(text)  # its error
    ids = tokenizer.hf.encode_batch([text], add_special_tokens=True)[0].ids
    if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_token_id):  # as Tokenizer.encode does
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def _resolver(future: asyncio.Future | None, result: Any, error: Exception | None) -> Callable[[], None]:
    def post() -> None:
        if future is None or future.done():  # fire-and-forget, or the caller was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    return post


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
    )


def _load(engine: LLMEngine, keys: dict[str, AdapterKey | None]) -> EngineLoad:
    stats = engine.stats()
    active = Counter(k for k in keys.values() if k is not None)
    adapters = tuple(
        AdapterResidency(r.key[0], r.key[1], r.where, max(r.in_use, active[r.key]), r.rank) for r in stats["adapters"]
    )
    return EngineLoad(stats["waiting"], stats["running"], stats["kv_blocks_free"], adapters,
                      stats["prefix_cache_queried_tokens"], stats["prefix_cache_hit_tokens"])
