"""The Python client of the public API (loraserve.v1.InferenceService): sync and asyncio, and a CLI on it.

    from loraserve_client import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("Write a SQL query:", model="sql-lora", max_tokens=32).text)
        for chunk in c.stream("Hello", max_tokens=16):
            print(chunk.text, end="")
        print([m.id for m in c.models()])

`AsyncClient` has the same methods as coroutines (`stream` is an async iterator). Admin calls (load,
unload) send `token` (default: $LORASERVE_ADMIN_TOKEN) as a bearer token. Errors raise `LoRAServeError`
with the gRPC status code and the server's message.
"""

from .aio import AsyncClient
from .client import Client
from .types import Chunk, Completion, LoRAServeError, Model

__all__ = ["AsyncClient", "Chunk", "Client", "Completion", "LoRAServeError", "Model"]
