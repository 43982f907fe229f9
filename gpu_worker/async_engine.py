"""AsyncEngine: the engine's step loop (EngineCore) behind an asyncio API.

The loop runs on a thread of this process or in a process of its own (engine_link.py: ThreadLink,
ProcessLink). Everything that touches the engine (add, abort, adapter prefetch / evict) is a command message;
the loop answers with one Batch an iteration (the new load, command results, per-request outputs), applied here
on the event loop in that order: status first, so a caller that sees its prefetch done also sees it in
`status()`. Prompts are tokenized here, off the step loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpu_worker.engine.chat_template import ChatPrompt
from gpu_worker.engine.errors import InvalidRequestError
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.lora_request import LoRARequest
from gpu_worker.engine.outputs import DeltaOutput, RequestOutput
from gpu_worker.engine.sampling_params import SamplingParams
from gpu_worker.engine.tokenizer import Tokenizer
from gpu_worker.engine_core import (
    LORA_OFF,
    Abort,
    AdapterResidency,
    Add,
    Batch,
    EngineInfo,
    EngineLoad,
    Evict,
    Prefetch,
    Stop,
    UnavailableError,
    from_wire,
)
from gpu_worker.engine_link import ProcessLink, ThreadLink

log = logging.getLogger(__name__)

# Longer prompts are tokenized on a pool thread with the GIL released (see encode_releasing_gil): with the test
# tokenizer 2 KiB takes 1.4 ms, 1 MiB 1.5 s, and `Tokenizer.encode` holds the GIL throughout, which would stall
# the event loop (and, on a ThreadLink, the step loop).
INLINE_TOKENIZE_CHARS = 2 * 1024

AdapterKey = tuple[str, str]

__all__ = ["LORA_OFF", "AdapterResidency", "AsyncEngine", "EngineInfo", "EngineLoad", "EngineStatus", "RequestStream",
           "UnavailableError", "merge_outputs"]


@dataclass(frozen=True)
class EngineStatus:
    state: str  # "starting", "serving", "draining", "stopped"
    info: EngineInfo | None
    load: EngineLoad | None
    version: int


def merge_outputs(outputs: list[RequestOutput | DeltaOutput], adapter_key: AdapterKey | None = None
                  ) -> RequestOutput:
    """Consecutive outputs of one request as one: the last, its deltas now all of theirs, in order. Outputs come
    as RequestOutputs or in their wire form (outputs.DeltaOutput), which becomes a RequestOutput here, once a
    message rather than once an output. A RequestOutput last is changed in place (each output the engine hands
    out is a new object, queued for one stream only): on a busy event loop, two dataclasses.replace a merge cost
    13% of its time (benchmarks.served_host). adapter_key: the request's, for an output in wire form."""
    last = from_wire(outputs[-1], adapter_key)
    if len(outputs) == 1:
        return last
    c = last.outputs[0]
    parts = [_deltas(o) for o in outputs]
    c.delta_text = "".join(p[0] for p in parts)
    c.delta_token_ids = [t for p in parts for t in p[1]]
    c.delta_logprobs = [lp for p in parts for lp in p[2]]
    return last


def _deltas(out: RequestOutput | DeltaOutput) -> tuple[str, list, list]:
    if isinstance(out, RequestOutput):
        c = out.outputs[0]
        return c.delta_text, c.delta_token_ids, c.delta_logprobs
    return out[1], out[2], out[3]


def _finished(out: RequestOutput | DeltaOutput) -> bool:
    return isinstance(out, RequestOutput) and out.finished


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
        while not _finished(queued[-1]) and not self._outputs.empty():
            more = self._outputs.get_nowait()
            if isinstance(more, BaseException):
                self._error = more
                break
            queued.append(more)
        item = merge_outputs(queued, self.adapter_key)
        self._done = item.finished
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._done:  # the client went away (cancel, deadline) or the server stopped: free its KV blocks
            self._done = True
            self._owner._abort(self.request_id)
        self._owner._stream_closed()


class AsyncEngine:
    def __init__(self, engine_factory: Callable[[], LLMEngine], process: bool = False):
        """`process`: run the engine in a process of its own (the factory must then pickle)."""
        self._link = ProcessLink(engine_factory) if process else ThreadLink(engine_factory)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._ids = itertools.count()
        self._call_ids = itertools.count()
        self._tokenizer: Tokenizer | None = None
        self._calls: dict[int, asyncio.Future] = {}
        # Where each live request's outputs go.
        self._queues: dict[str, asyncio.Queue] = {}
        self._running = False
        self._state = "starting"
        self._info: EngineInfo | None = None
        self._load: EngineLoad | None = None
        self._version = 0
        self._changed = asyncio.Event()
        self._open_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Called (on the event loop) when the engine ends without being stopped: its process died, or its step loop
        # failed.
        self.on_death: Callable[[BaseException], None] | None = None

    # -- lifecycle (event loop) -------------------------------------------------------------------

    async def start(self, preload: list[LoRARequest] = ()) -> EngineInfo:
        """Build the engine and read every pre-loaded adapter; raises what that raised."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._running = True
        self._link.start(list(preload), self._apply, self._loop)
        info = await self._ready
        self._tokenizer = await asyncio.to_thread(Tokenizer, info.tokenizer)
        self._info = info
        self._publish_state()
        return info

    @property
    def engine_pid(self) -> int | None:
        """The process the step loop runs in (this one's, on a thread)."""
        return self._link.pid

    @property
    def state(self) -> str:
        return self._state

    def set_state(self, state: str) -> None:
        self._state = state
        self._publish_state()

    async def stop(self) -> None:
        """Stop the step loop (requests still running get an error) and wait for it to end."""
        if self._running and self._link.alive():
            with contextlib.suppress(UnavailableError):
                self._link.send(Stop())
        await asyncio.to_thread(self._link.join)
        self._running = False
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
            # Tokenized here (off the engine's loop); the text goes along so the engine checks it as it
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
        stream = RequestStream(self, rid, outputs, None)
        self._queues[rid] = outputs
        self._stream_opened()
        try:
            stream.adapter_key = await self._call(lambda call: Add(call, rid, prompt, params, lora_request,
                                                                   content_hash))
        except BaseException:
            # Refused (nothing held), or cancelled while the add was queued: the abort that close() sends
            # follows the add and frees whatever it took.
            stream.close()
            raise
        return stream

    async def prefetch(self, lora_request: LoRARequest, content_hash: str = "") -> AdapterResidency:
        """Read the adapter into host memory (idempotent) and say where it now is."""
        return await self._call(lambda call: Prefetch(call, lora_request, content_hash))

    async def evict(self, name: str, content_hash: str = "") -> int:
        return await self._call(lambda call: Evict(call, name, content_hash))

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

    async def _call(self, command: Callable[[int], Any]) -> Any:
        if not self._running or not self._link.alive():
            raise UnavailableError("the engine is not running")
        call = next(self._call_ids)
        future = self._calls[call] = self._loop.create_future()
        try:
            self._link.send(command(call))
            return await future
        finally:
            self._calls.pop(call, None)

    def _abort(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        if self._running:
            with contextlib.suppress(UnavailableError):
                self._link.send(Abort(request_id))

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

    def _apply(self, batch: Batch) -> None:
        """One Batch from the step loop, in its order (Batch says why)."""
        if batch.ready is not None and not self._ready.done():
            if isinstance(batch.ready, BaseException):
                self._ready.set_exception(batch.ready)
            else:
                self._ready.set_result(batch.ready)
        if batch.load is not None:
            self._load = batch.load
            self._publish_state()
        for call, result, error in batch.results:
            future = self._calls.get(call)
            if future is None or future.done():  # the caller was cancelled meanwhile
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        for item in batch.outputs:  # a RequestOutput or its wire form: made whole by the stream that reads it
            rid = item.request_id if isinstance(item, RequestOutput) else item[0]
            outputs = self._queues.get(rid)
            if outputs is None:
                continue
            if _finished(item):
                del self._queues[rid]
            outputs.put_nowait(item)
        for rid, error in batch.failed:
            outputs = self._queues.pop(rid, None)
            if outputs is not None:
                outputs.put_nowait(error)
        if batch.stopped:
            self._ended(batch.died)

    def _ended(self, died: BaseException | None) -> None:
        """The step loop is over: whatever still waits on it gets an error."""
        self._running = False
        error = died or UnavailableError("the engine stopped")
        if not self._ready.done():
            self._ready.set_exception(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        for outputs in self._queues.values():
            outputs.put_nowait(error)
        self._queues.clear()
        if died is not None:
            log.error("%s", died)
            self.set_state("stopped")
            if self.on_death is not None:
                self.on_death(died)


def encode_releasing_gil(tokenizer: Tokenizer, text: str) -> list[int]:
    """`tokenizer.encode(text)`, through `encode_batch`, which releases the GIL while it works (`encode` does not)."""
    if not isinstance(text, str):
        return tokenizer.encode(text)  # its error
    ids = tokenizer.hf.encode_batch([text], add_special_tokens=True)[0].ids
    if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_token_id):  # as Tokenizer.encode does
        ids = [tokenizer.bos_token_id, *ids]
    return ids
