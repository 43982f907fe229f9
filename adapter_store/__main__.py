"""python -m adapter_store [--cache-dir DIR] [--lora-root DIR] [--s3-bucket B] [--port 0] ...

Prints one line `adapter-store serving on <host:port>` on stdout once it is SERVING (logs go to stderr).
SIGTERM or SIGINT: drain (up to --drain-timeout-s), then exit 0; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from adapter_store.config import StoreConfig
from adapter_store.server import StartupError, StoreServer

log = logging.getLogger("adapter_store")


async def serve(config: StoreConfig) -> int:
    server = StoreServer(config)
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
    print(f"adapter-store serving on {server.listen_address}", flush=True)

    await stop.wait()
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
    config = StoreConfig.from_args(argv)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
