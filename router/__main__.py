"""python -m router [--workers host:port,...] [--redis-url URL] [--store-address host:port] [--port 50051]

Prints one line `router serving on <host:port>` on stdout once a worker is routable (logs go to stderr;
until then the router answers, health NOT_SERVING, requests UNAVAILABLE). SIGTERM or SIGINT: drain (up to
--drain-timeout-s), then exit 0; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from router.config import RouterConfig
from router.server import RouterServer, StartupError
from service_kit.lifecycle import configure_logging, serve

log = logging.getLogger("router")


class UntilRoutable:
    """The router's start, as service_kit's lifecycle sees it: listening, and a worker routable."""

    def __init__(self, server: RouterServer):
        self.server = server

    async def start(self) -> None:
        await self.server.start()
        try:
            await self.server.serving.wait()
        except asyncio.CancelledError:  # a signal before any worker came: stop what runs
            await self.server.shutdown(0)
            raise

    async def shutdown(self, grace: float | None = None) -> None:
        await self.server.shutdown(grace)


def main(argv: list[str] | None = None) -> int:
    config = RouterConfig.from_args(argv)
    configure_logging(config.log_level)

    async def run() -> int:
        server = RouterServer(config)  # built on the loop: it makes asyncio objects
        return await serve(UntilRoutable(server), lambda: f"router serving on {server.listen_address}",
                           (StartupError,), log)

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
