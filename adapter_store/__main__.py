"""python -m adapter_store [--cache-dir DIR] [--lora-root DIR] [--s3-bucket B] [--port 0] ...

Prints one line `adapter-store serving on <host:port>` on stdout once it is SERVING (logs go to stderr).
SIGTERM or SIGINT: drain (up to --drain-timeout-s), then exit 0; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from adapter_store.config import StoreConfig
from adapter_store.server import StartupError, StoreServer
from service_kit.lifecycle import configure_logging, serve

log = logging.getLogger("adapter_store")


def main(argv: list[str] | None = None) -> int:
    config = StoreConfig.from_args(argv)
    configure_logging(config.log_level)
    server = StoreServer(config)
    return asyncio.run(serve(server, lambda: f"adapter-store serving on {server.listen_address}", (StartupError,), log))


if __name__ == "__main__":
    sys.exit(main())
