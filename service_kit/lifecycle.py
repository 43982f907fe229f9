"""A service process's life, the same for every service: start (a signal while starting gives up), freeze what
start-up built out of the collector's reach, print one ready line on stdout, wait for SIGTERM or SIGINT, drain (a
second signal stops at once), exit 0; exit 1 when it fails to start, or fails for good while serving (its `failed`
event)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Callable
from typing import Protocol


class Server(Protocol):
    async def start(self) -> None: ...

    async def shutdown(self, grace: float | None = None) -> None: ...


class StartupError(Exception):
    """The service cannot start; the message says why and what to change."""


def listen(server, host: str, port: int) -> tuple[str, int]:
    """Bind a grpc.aio server to host:port: (the host as an address names it, an IPv6 one in brackets; the port
    bound, which port 0 picks). StartupError where it cannot (the port is taken)."""
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    try:
        return host, server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {host}:{port} ({e}); is the port taken?") from None


def freeze_heap() -> None:
    """Move every object alive now into the collector's permanent generation: what a service built to start
    (modules, a model, its tokenizer) lives as long as the process, and a full collection while serving then scans
    only what serving made, not all of it, with every request waiting (the demo engine on the dev CPU: 86 ms
    against 0.005; the router's imports alone: 27 ms). vLLM does the same after its start."""
    gc.collect()
    gc.freeze()


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def serve(server: Server, ready_line: Callable[[], str], startup_errors: tuple[type[Exception], ...],
                log: logging.Logger) -> int:
    """Run `server` until a signal; 1 when it fails to start (one of `startup_errors`) or for good while it serves,
    else 0."""
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
        with contextlib.suppress(asyncio.CancelledError, *startup_errors):
            await starting
        return 0
    try:
        starting.result()
    except startup_errors as e:
        log.error("%s", e)
        return 1
    freeze_heap()
    print(ready_line(), flush=True)

    # A server may fail for good while it serves (the worker's engine is gone): `failed`, an asyncio.Event.
    failed = getattr(server, "failed", None)
    gone = asyncio.create_task(failed.wait()) if failed is not None else None
    await asyncio.wait({stopped} | ({gone} if gone else set()), return_when=asyncio.FIRST_COMPLETED)
    if gone is not None and gone.done():
        log.error("the server cannot go on serving; stopping")
        stopped.cancel()
        await server.shutdown(0)
        return 1
    if gone is not None:
        gone.cancel()
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
