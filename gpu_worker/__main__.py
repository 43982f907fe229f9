"""python -m gpu_worker --model-dir DIR [--lora-modules sql=/path ...] [--port 0]

Prints one line `worker <id> serving on <host:port>` on stdout once it is SERVING (logs go to stderr).
SIGTERM or SIGINT: drain (up to --drain-timeout-s), then exit 0; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from gpu_worker.config import WorkerConfig
from gpu_worker.server import StartupError, WorkerServer
from service_kit.lifecycle import configure_logging, serve

log = logging.getLogger("gpu_worker")


def main(argv: list[str] | None = None) -> int:
    config = WorkerConfig.from_args(argv)
    configure_logging(config.log_level)
    if config.adapter_store:
        log.info("adapters not found locally resolve through the adapter store at %s", config.adapter_store)
    server = WorkerServer(config)
    ready = lambda: f"worker {server.worker_id} serving on {server.listen_address}"
    return asyncio.run(serve(server, ready, (StartupError,), log))


if __name__ == "__main__":
    sys.exit(main())
