"""Routers, fake workers and stores on one event loop in a background thread (grpc.aio wants one loop), driven
by ordinary sync gRPC clients from the tests, as any client would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc
import pytest

from loraserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from router.config import RouterConfig
from router.server import RouterServer
from tests.loop_thread import LoopThread
from tests.router.fakes import FakeWorker, serving

ADMIN_TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread("router-test-loop", timeout=120)
    yield lt
    lt.close()


def router_config(**overrides) -> RouterConfig:
    values = dict(host="127.0.0.1", port=0, metrics_port=0, status_interval_ms=10, drain_timeout_s=0,
                  registry_poll_s=0.1, catalog_refresh_s=0.5)
    values.update(overrides)
    return RouterConfig(**values)


@contextlib.contextmanager
def running_router(loop: LoopThread, config: RouterConfig, wait: bool = True) -> Iterator[RouterServer]:
    server = loop.run(_construct(config))
    loop.run(server.start())
    try:
        if wait:
            loop.run(asyncio.wait_for(server.serving.wait(), 60))
        yield server
    finally:
        loop.run(server.shutdown(0))


async def _construct(config: RouterConfig) -> RouterServer:
    return RouterServer(config)  # built on the loop: it makes asyncio objects


@contextlib.contextmanager
def fake_workers(loop: LoopThread, *workers: FakeWorker) -> Iterator[list[FakeWorker]]:
    stack = contextlib.AsyncExitStack()
    for w in workers:
        loop.run(stack.enter_async_context(serving(w)))
    try:
        yield list(workers)
    finally:
        loop.run(stack.aclose())


@contextlib.contextmanager
def router_stub(server: RouterServer) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def gen_request(model: str = "", prompt: str = "hello", max_tokens: int = 4, request_id: str = "",
                **sampling) -> inference_pb2.GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return inference_pb2.GenerateRequest(request_id=request_id, model=model, prompt=common_pb2.Prompt(text=prompt),
                                         sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **sampling))


def stream_request(model: str = "", prompt: str = "hello", max_tokens: int = 4,
                   request_id: str = "") -> inference_pb2.GenerateStreamRequest:
    return inference_pb2.GenerateStreamRequest(request_id=request_id, model=model,
                                               prompt=common_pb2.Prompt(text=prompt),
                                               sampling=common_pb2.SamplingParams(max_tokens=max_tokens,
                                                                                  temperature=0.0))


def admin_metadata(token: str = ADMIN_TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)

