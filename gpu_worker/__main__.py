"""python -m gpu_worker --model-dir DIR [--lora-modules sql=/path ...] [--port 0]

Prints one line `worker <id> serving on <host:port>` on stdout once it is SERVING (logs go to stderr).
SIGTERM or SIGINT: drain (up to --drain-timeout-s), then exit 0; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from gpu_worker.config import WorkerConfig
from gpu_worker.server import StartupError, WorkerServer

log = logging.getLogger("gpu_worker")


async def serve(config: WorkerConfig) -> int:
    server = WorkerServer(config)
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

    starting = asyncio.create_task(server.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal while loading: give up loading
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, StartupError):
            await starting
        return 0
    try:
        starting.result()
    except StartupError as e:
        log.error("%s", e)
        return 1
    print(f"worker {server.worker_id} serving on {server.listen_address}", flush=True)

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
    config = WorkerConfig.from_args(argv)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.adapter_store:
        log.info("adapters not found locally resolve through the adapter store at %s", config.adapter_store)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
