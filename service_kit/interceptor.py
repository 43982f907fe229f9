"""One server interceptor per service maps our exceptions to gRPC status codes and logs each error once."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import grpc

StatusFor = Callable[[Exception], tuple[grpc.StatusCode, str]]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the handlers of `service_name` (health and reflection raise nothing of ours): an exception
    leaves as the status `status_for` gives it; INTERNAL ones are logged with their traceback."""

    def __init__(self, service_name: str, status_for: StatusFor, log: logging.Logger):
        self._prefix = f"/{service_name}/"
        self._status_for = status_for
        self._log = log

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, method))
        return handler

    async def _abort(self, context, method: str, error: Exception):
        code, message = self._status_for(error)
        if code is grpc.StatusCode.INTERNAL:
            self._log.error("%s failed", method, exc_info=error)
        else:
            self._log.info("%s: %s %s", method, code.name, message)
        await context.abort(code, message)

    def _unary(self, behavior, method: str):
        async def handle(request, context):
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as e:  # every error leaves as a status code
                await self._abort(context, method, e)

        return handle

    def _stream(self, behavior, method: str):
        async def handle(request, context):
            try:
                # aclosing: a stream the client cancels still runs the handler's cleanup (abort, file close) now.
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await self._abort(context, method, e)

        return handle
