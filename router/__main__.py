"""python -m router [--workers host:port,...] [--redis-url URL] [--store-address host:port] [--port 50051]

Prints one line `router serving on <host:port>` on stdout once a worker is routable (logs go to stderr).
SIGTERM or SIGINT: drain (up to --drain-timeout-s), then exit 0; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from router.config import RouterConfig
from router.server import RouterServer, StartupError

log = logging.getLogger("router")


async def serve(config: RouterConfig) -> int:
    server = RouterServer(config)
    loop = asyncio.get_running_loop()
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s: draining", sig.name)
            stop.set()
        else:
            log.warning("%s again: stopping now", sig.name)
            hurry.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.start()
    except StartupError as e:
        log.error("%s", e)
        return 1

    ready = asyncio.create_task(server.serving.wait())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        print(f"router serving on {server.listen_address}", flush=True)
    else:
        ready.cancel()

    await stopped
    draining = asyncio.create_task(server.shutdown())
    hurried = asyncio.create_task(hurry.wait())
    await asyncio.wait({draining, hurried}, return_when=asyncio.FIRST_COMPLETED)
    if not draining.done():
        draining.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await draining
        await server.shutdown(0)
    hurried.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    config = RouterConfig.from_args(argv)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
