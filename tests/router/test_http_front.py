"""The HTTP front's error mapping in process (aiohttp's test server, a dispatcher that fails as asked): each
gRPC status becomes its HTTP status and an OpenAI error object, before a stream starts and after."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router import errors
from router.domain import Delta, Usage
from router.http_front import HttpFront
from router.service import InferenceService


class FailingDispatcher:
    def __init__(self, error: errors.RouterError | None, after: int = 0):
        self.error, self.after = error, after

    async def generate(self, req):
        return [d async for d in self.stream(req)]

    async def stream(self, req):
        for i in range(self.after):
            yield Delta(text=f"t{i}", token_ids=(i,))
        if self.error is not None:
            raise self.error
        yield Delta(text="!", token_ids=(9,), finish_reason="length", usage=Usage(3, self.after + 1))


def front(dispatcher) -> HttpFront:
    service = InferenceService(dispatcher, None, None, None)
    return HttpFront(service, dispatcher, None, None, None, None)


async def call(dispatcher, body: dict) -> tuple[int, str]:
    async with TestClient(TestServer(front(dispatcher).app())) as client:
        resp = await client.post("/v1/completions", json=body)
        return resp.status, await resp.text()


@pytest.mark.parametrize("error, status", [
    (errors.ResourceExhaustedError("every worker is at its load cap"), 429),
    (errors.UnavailableError("no live worker"), 503),
    (errors.NotFoundError("model 'x' is unknown"), 404),
    (errors.InvalidArgumentError("temperature must be >= 0"), 400),
    (errors.FailedPreconditionError("adapter is for another base model"), 400),
    (errors.DeadlineExceededError("deadline"), 504),
    (errors.InternalError("boom"), 500),
])
@pytest.mark.parametrize("stream", [False, True])
def test_statuses_map_before_the_stream_starts(error, status, stream):
    got, text = asyncio.run(call(FailingDispatcher(error), {"model": "m", "prompt": "hi", "stream": stream}))
    body = json.loads(text)
    assert got == status and body["error"]["code"] == status and body["error"]["message"] == str(error)


def test_an_error_mid_stream_is_an_event_then_done():
    error = errors.UnavailableError("worker w1 was lost after 2 messages")
    got, text = asyncio.run(call(FailingDispatcher(error, after=2), {"model": "m", "prompt": "hi", "stream": True}))
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert got == 200 and events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["t0", "t1"]
    assert json.loads(events[2])["error"] == {"message": str(error), "type": "server_error", "param": None,
                                              "code": 503}


def test_a_body_over_the_limit_is_refused():
    async def run():
        async with TestClient(TestServer(front(FailingDispatcher(None)).app())) as client:
            resp = await client.post("/v1/completions", data=b"x" * (5 * 1024 * 1024),
                                     headers={"Content-Type": "application/json"})
            return resp.status, await resp.json()

    status, body = asyncio.run(run())
    assert status == 413 and "over" in body["error"]["message"]
