"""ErrorInterceptor: the one place our exceptions become gRPC status codes, each logged once (INFO for the
client's errors and the cluster's, ERROR with a traceback for a bug of ours)."""

from __future__ import annotations

import contextlib
import logging

import grpc

from router.errors import RouterError

log = logging.getLogger(__name__)


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, RouterError):
        return grpc.StatusCode[error.code], str(error)
    return grpc.StatusCode.INTERNAL, f"internal error in the router ({type(error).__name__}: {error}); see its log"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service_name: str):
        self._prefix = f"/{service_name}/"
        # method -> (the handler grpc gave, our wrapper): wrapped once, not on every call
        self._wrapped: dict[str, tuple[object, object]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler  # health and reflection raise nothing of ours
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = handler
        if handler.unary_unary is not None:
            wrapped = handler._replace(unary_unary=_unary(handler.unary_unary, method))
        elif handler.unary_stream is not None:
            wrapped = handler._replace(unary_stream=_stream(handler.unary_stream, method))
        self._wrapped[method] = (handler, wrapped)
        return wrapped


async def _abort(context, method: str, error: Exception):
    code, message = status_for(error)
    if code is grpc.StatusCode.INTERNAL and not isinstance(error, RouterError):
        log.error("%s failed", method, exc_info=error)
    else:
        log.info("%s: %s %s", method, code.name, message)
    await context.abort(code, message)


def _unary(behavior, method: str):
    async def handle(request, context):
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # every error leaves as a status code
            await _abort(context, method, e)

    return handle


def _stream(behavior, method: str):
    async def handle(request, context):
        try:
            # aclosing: a stream the server stops iterating runs its cleanup (cancelling the worker's call) now
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(context, method, e)

    return handle
