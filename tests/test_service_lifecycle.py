"""service_kit.lifecycle.serve, the life every service's `python -m` runs: the heap start-up built is frozen before the
ready line, and a signal drains the server."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal

from service_kit.lifecycle import serve


class Server:
    def __init__(self):
        self.frozen_at_ready = -1
        self.drained = False

    async def start(self) -> None:
        self.built = [{"start-up": i} for i in range(1000)]  # what a service builds to start

    async def shutdown(self, grace: float | None = None) -> None:
        self.drained = True


def test_the_start_up_heap_is_frozen_before_the_ready_line_and_a_signal_drains():
    server = Server()

    def ready() -> str:
        server.frozen_at_ready = gc.get_freeze_count()
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)
        return "ready"

    before = gc.get_freeze_count()
    try:
        assert asyncio.run(serve(server, ready, (), logging.getLogger("test"))) == 0
        assert server.frozen_at_ready >= before + 1000 and server.drained
    finally:
        gc.unfreeze()
