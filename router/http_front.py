"""The router's OpenAI-compatible HTTP front (`--http-port`): vLLM's curl workflows, unchanged.

    POST /v1/completions               (stream: server-sent events; stream_options.include_usage)
    POST /v1/chat/completions          (the same; the worker renders the model's chat template)
    GET  /v1/models                    (adapters carry `parent` = the base model)
    POST /v1/load_lora_adapter         (admin: off unless enabled, then `Authorization: Bearer <token>`)
    POST /v1/unload_lora_adapter
    GET  /health                       (200 while a worker is routable, else 503)
    GET  /metrics                      (the router's Prometheus metrics, vllm:lora_requests_info among them)

aiohttp, because it is a mature asyncio server that runs in the router's own event loop beside grpc.aio: the
handlers call the same Dispatcher, catalogue and admin objects the gRPC servicer calls, with no thread hop,
no second process and no ASGI stack (FastAPI would bring uvicorn, starlette and pydantic for the same job).
Every request becomes the GenerateRequest a gRPC client would send (router/openai_api.py); errors come back
in OpenAI's JSON error shape with the HTTP status matching the gRPC status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from router import errors, openai_api
from router.admin import AdapterAdmin
from router.catalog import AdapterCatalog
from router.dispatcher import Dispatcher
from router.domain import LoadRequest
from router.metrics import RouterMetrics
from router.registry import WorkerRegistry
from router.service import InferenceService

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024  # as the gRPC server's max receive size


class HttpFront:
    def __init__(self, service: InferenceService, dispatcher: Dispatcher, catalog: AdapterCatalog,
                 admin: AdapterAdmin, registry: WorkerRegistry, metrics: RouterMetrics):
        self.service, self.dispatcher, self.catalog = service, dispatcher, catalog
        self.admin, self.registry, self.metrics = admin, registry, metrics
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load_adapter)
        app.router.add_post("/v1/unload_lora_adapter", self.unload_adapter)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        return app

    async def start(self, host: str, port: int, drain_timeout_s: float = 30.0) -> int:
        """Listen; on stop(), requests in flight get `drain_timeout_s` to finish."""
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                     shutdown_timeout=drain_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish (up to the drain timeout), close."""
        if self._runner is not None:
            await self._runner.cleanup()

    # -- handlers -------------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        pbs, n, stream, include_usage = openai_api.completion_request(await _json(request), _request_id(request))
        return await self._generate(request, pbs, n, stream, include_usage, openai_api.COMPLETION)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        pbs, n, stream, include_usage = openai_api.chat_request(await _json(request), _request_id(request))
        return await self._generate(request, pbs, n, stream, include_usage, openai_api.CHAT)

    async def _generate(self, request: web.Request, pbs: list, n: int, stream: bool, include_usage: bool,
                        shapes: openai_api.Shapes) -> web.StreamResponse:
        """One generation per choice (several prompts, n samples each), run concurrently; the answer holds them
        all, by index. A choice that fails fails the request, and the others are cancelled."""
        gens = [self.service.generation_request(pb, timeout=None, buffered=not stream) for pb in pbs]
        rid, model, with_logprobs = gens[0].request_id, pbs[0].model, pbs[0].sampling.HasField("logprobs")
        if not stream:
            choices = await _all([self.dispatcher.generate(g) for g in gens])
            return web.json_response(shapes.whole(rid, model, choices, with_logprobs, n))
        created = int(time.time())
        streams = [self.dispatcher.stream(g) for g in gens]
        try:
            # Every choice's first delta before any byte goes out: a request refused up front (unknown model, bad
            # parameters, no worker) still gets its status code and error object rather than a 200 stream.
            firsts = await _all([anext(s, None) for s in streams])
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            seen: list[list] = [[] for _ in streams]
            try:
                for k, first in enumerate(firsts):
                    if first is not None:
                        seen[k].append(first)
                        await _event(response, shapes.chunk(rid, model, created, first, True, with_logprobs, k))
                # Closed on the way out (a client gone, an error): its pumps stop before the streams are closed.
                async with contextlib.aclosing(_merged(streams)) as merged:
                    async for k, d in merged:
                        seen[k].append(d)
                        await _event(response, shapes.chunk(rid, model, created, d, False, with_logprobs, k))
                if include_usage:
                    await _event(response, shapes.usage_chunk(rid, model, created, openai_api.usage(seen, n)))
            except errors.RouterError as e:  # after the 200: the error goes as an event, as vLLM sends it
                await _event(response, openai_api.error_body(openai_api.HTTP_STATUS.get(e.code, 500), str(e)))
        finally:
            for s in streams:
                await s.aclose()  # a client gone mid-stream cancels the workers' calls
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        models = await self.catalog.list_models()
        return web.json_response({"object": "list", "data": [openai_api.model_card(m) for m in models]})

    async def load_adapter(self, request: web.Request) -> web.Response:
        body = await _json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        inplace, base = body.get("load_inplace", False), body.get("base_model_name", "")
        if not isinstance(name, str) or not name:
            raise openai_api.bad_request("lora_name is required", "lora_name")
        if not isinstance(path, str) or not path:
            raise openai_api.bad_request(
                "lora_path is required: where the adapter's files are (a directory, hf://, s3://)", "lora_path")
        if not isinstance(inplace, bool) or not isinstance(base, str):
            raise openai_api.bad_request("load_inplace must be true or false and base_model_name a string")
        await self.admin.load(LoadRequest(name, path, base, inplace), request.headers.get("Authorization"))
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, request: web.Request) -> web.Response:
        body = await _json(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise openai_api.bad_request("lora_name is required", "lora_name")
        await self.admin.unload(name, request.headers.get("Authorization"))
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def health(self, request: web.Request) -> web.Response:
        if self.registry.routable():
            return web.Response(text="")
        return _error(503, "no worker is routable")

    async def prometheus(self, request: web.Request) -> web.Response:
        data = await asyncio.get_running_loop().run_in_executor(None, self.metrics.exposition)
        return web.Response(body=data, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # -- errors ---------------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except errors.RouterError as e:
            return _error(openai_api.HTTP_STATUS.get(e.code, 500), str(e), getattr(e, "param", None))
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        except web.HTTPException as e:  # 404 unknown path, 405 wrong method
            return _error(e.status, f"{request.method} {request.path}: {e.reason}")
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return _error(500, "internal error in the router; see its log")


def _request_id(request: web.Request) -> str:
    """The client's X-Request-Id (kept when it fits, as the gRPC API's request_id), else the router assigns one."""
    rid = request.headers.get("X-Request-Id", "")
    return rid if len(rid) <= 128 and rid.isprintable() else ""


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(openai_api.error_body(status, message, param), status=status)


async def _json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise openai_api.bad_request(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise openai_api.bad_request("the request body must be a JSON object")
    return body


async def _all(awaitables: list) -> list:
    """Their results, run concurrently; the first failure cancels the rest (and is raised as it is)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _merged(streams: list) -> AsyncIterator[tuple[int, object]]:
    """(stream index, item) from several async iterators as the items come; a failure in one is raised here, and
    leaving (or failing) stops every pump."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(k: int, s) -> None:
        try:
            async for item in s:
                await queue.put((k, item))
            await queue.put((k, done))
        except Exception as e:  # noqa: BLE001 (handed to the consumer, which raises it)
            await queue.put((k, e))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            k, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _event(response: web.StreamResponse, obj: dict) -> None:
    """One server-sent event. A client gone raises ConnectionResetError: the stream's generator is closed,
    which cancels the worker's call."""
    await response.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")
