"""RequestStream: a reader that fell behind gets the outputs already queued as one (deltas in order, the
last one's totals), never past the request's end, and an error queued behind them right after."""

from __future__ import annotations

import asyncio

import pytest

from gpu_worker.async_engine import RequestStream
from gpu_worker.engine.outputs import CompletionOutput, Logprob, RequestOutput


class Owner:
    """The AsyncEngine side of a stream: records the aborts close() submits and the streams it closes."""

    def __init__(self):
        self.aborted: list[str] = []
        self.closed = 0

    def _abort(self, rid):
        self.aborted.append(rid)

    def _stream_closed(self):
        self.closed += 1


def out(i: int, finished: bool = False) -> RequestOutput:
    c = CompletionOutput(0, text="x" * (i + 1), token_ids=list(range(i + 1)),
                         finish_reason="length" if finished else None, delta_text=f"t{i} ",
                         delta_token_ids=[100 + i], delta_logprobs=[Logprob(100 + i, -0.5)])
    return RequestOutput("r", None, [1, 2], [c], finished=finished)


def test_queued_outputs_come_as_one_and_the_end_is_kept():
    async def run():
        q: asyncio.Queue = asyncio.Queue()
        stream = RequestStream(Owner(), "r", q, None)
        for i in range(3):
            q.put_nowait(out(i))
        merged = await stream.__anext__()
        c = merged.outputs[0]
        assert (c.delta_text, c.delta_token_ids, [lp.token_id for lp in c.delta_logprobs]) == \
            ("t0 t1 t2 ", [100, 101, 102], [100, 101, 102])
        assert c.token_ids == [0, 1, 2] and not merged.finished  # totals: the latest output's
        q.put_nowait(out(3))
        q.put_nowait(out(4, finished=True))
        q.put_nowait(out(5))  # nothing after the end is taken
        last = await stream.__anext__()
        assert last.finished and last.outputs[0].delta_token_ids == [103, 104]
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        stream.close()
        return stream._owner

    owner = asyncio.run(run())
    assert owner.aborted == [] and owner.closed == 1  # finished: nothing to abort


def test_an_error_behind_queued_outputs_comes_next():
    async def run():
        q: asyncio.Queue = asyncio.Queue()
        stream = RequestStream(Owner(), "r", q, None)
        q.put_nowait(out(0))
        q.put_nowait(out(1))
        q.put_nowait(RuntimeError("the engine failed"))
        first = await stream.__anext__()
        assert first.outputs[0].delta_token_ids == [100, 101]
        with pytest.raises(RuntimeError, match="engine failed"):
            await stream.__anext__()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()

    asyncio.run(run())


def test_an_output_alone_is_passed_as_it_is():
    async def run():
        q: asyncio.Queue = asyncio.Queue()
        stream = RequestStream(Owner(), "r", q, None)
        o = out(0)
        q.put_nowait(o)
        assert await stream.__anext__() is o
        stream.close()  # the reader left before the end: the request is aborted, once
        stream.close()
        return stream._owner

    owner = asyncio.run(run())
    assert owner.aborted == ["r"] and owner.closed == 1


def test_outputs_in_wire_form_become_one_output_a_read():
    """From an engine process, streamed outputs come as (request_id, delta text, delta ids, delta logprobs); the
    final one whole. The stream gives them the request's adapter key."""

    def wire(i: int) -> tuple:  # as an engine with wire_deltas builds it
        c = out(i).outputs[0]
        return ("r", c.delta_text, c.delta_token_ids, c.delta_logprobs)

    async def run():
        q: asyncio.Queue = asyncio.Queue()
        stream = RequestStream(Owner(), "r", q, ("sql", "h"))
        q.put_nowait(wire(0))
        alone = await stream.__anext__()
        assert isinstance(alone, RequestOutput) and not alone.finished and alone.adapter_key == ("sql", "h")
        assert (alone.request_id, alone.outputs[0].delta_text, alone.outputs[0].delta_token_ids) == ("r", "t0 ", [100])
        q.put_nowait(wire(1))
        q.put_nowait(wire(2))
        q.put_nowait(out(3, finished=True))
        last = await stream.__anext__()
        c = last.outputs[0]
        assert last.finished and (c.delta_text, c.delta_token_ids) == ("t1 t2 t3 ", [101, 102, 103])
        assert [lp.token_id for lp in c.delta_logprobs] == [101, 102, 103]
        assert c.token_ids == [0, 1, 2, 3]  # the totals: the final output's
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()

    asyncio.run(run())
