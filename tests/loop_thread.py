"""An asyncio event loop on a background thread: the services' grpc.aio servers want one loop, and the tests drive
them from ordinary sync gRPC clients, as any client would."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable


class LoopThread:
    def __init__(self, name: str = "test-aio-loop", timeout: float = 60):
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float | None = None):
        return self.submit(coro).result(self.timeout if timeout is None else timeout)

    def call(self, fn: Callable, *args):
        """Run a plain function on the loop's thread (to touch loop-owned state safely)."""

        async def wrapper():
            return fn(*args)

        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
