"""AdapterStoreService: the gRPC servicer (thin: translate, run the store's blocking calls on its thread
pools, translate back) and the one interceptor that turns our exceptions into status codes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc

from adapter_store import convert
from adapter_store.auth import AdminGuard
from adapter_store.errors import (
    AdapterRejectedError,
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    NotServingError,
    OutOfRangeError,
    PermissionDeniedError,
    SourceUnavailableError,
    UnauthenticatedError,
)
from adapter_store.hashing import CHUNK_BYTES
from adapter_store.store import AdapterStore
from loraserve.v1 import adapter_store_pb2
from service_kit.interceptor import ErrorInterceptor

log = logging.getLogger(__name__)

SERVICE = adapter_store_pb2.DESCRIPTOR.services_by_name["AdapterStoreService"]
SERVICE_NAME = SERVICE.full_name


@dataclass
class Runtime:
    """What the servicer works with; `store` is None until the server is warm."""

    guard: AdminGuard
    downloads: Executor
    io: Executor
    store: AdapterStore | None = None


class AdapterStoreService:
    def __init__(self, runtime: Runtime):
        self.rt = runtime

    async def ResolveAdapter(self, request, context):
        store = self._store()
        # cached: answered on the I/O pool, never queued behind downloads of other adapters
        manifest = await self._run(self.rt.io, store.cached, request.name)
        if manifest is None:
            manifest = await self._run(self.rt.downloads, store.resolve, request.name)
        return adapter_store_pb2.ResolveAdapterResponse(manifest=convert.manifest(manifest))

    async def FetchAdapter(self, request, context):
        store, ref = self._store(), request.ref
        size = request.chunk_size if 0 < request.chunk_size <= CHUNK_BYTES else CHUNK_BYTES
        file = await self._open(self.rt.io, store, ref, request.path, False)
        if file is None:  # not cached (never resolved here, or evicted since): download it, on the download pool
            file = await self._open(self.rt.downloads, store, ref, request.path, True)
        pending = None
        try:
            file.check_offset(request.offset)
            if request.offset:
                log.info("Fetch %s@%s %s resumes at offset %d of %d", ref.name, ref.content_hash[:12], file.path,
                         request.offset, file.size)
            offset = request.offset
            # read-ahead: the next chunk comes off the disk while this one goes out
            pending = self._run(self.rt.io, file.read, offset, size) if offset < file.size else None
            while pending is not None:
                chunk = await pending
                if not chunk.data:
                    raise OSError(f"{file.path} is shorter on disk than its manifest says ({offset} < {file.size})")
                offset += len(chunk.data)
                pending = self._run(self.rt.io, file.read, offset, size) if offset < file.size else None
                yield convert.fetch_chunk(file.path, chunk.offset, chunk.data, chunk.sha256, file.size)
        finally:  # close once no read is in flight (a cancelled stream may leave one)
            if pending is not None and not pending.done():
                pending.add_done_callback(lambda done: (done.cancelled() or done.exception(), file.close()))
            else:
                file.close()

    async def ListAdapters(self, request, context):
        manifests = await self._run(self.rt.io, self._store().list)
        return adapter_store_pb2.ListAdaptersResponse(adapters=[convert.manifest(m) for m in manifests])

    async def RegisterAdapter(self, request, context):
        store = self._store()
        self.rt.guard.check(_authorization(context))
        manifest = await self._run(self.rt.downloads, store.register, request.name, request.source_uri,
                                   request.base_model_name, request.replace)
        return adapter_store_pb2.RegisterAdapterResponse(manifest=convert.manifest(manifest))

    async def DeleteAdapter(self, request, context):
        store = self._store()
        self.rt.guard.check(_authorization(context))
        await self._run(self.rt.io, store.delete, request.name)
        return adapter_store_pb2.DeleteAdapterResponse()

    async def _open(self, pool: Executor, store: AdapterStore, ref, path: str, download: bool):
        opening = self._run(pool, store.open_file, ref.name, ref.content_hash, path, download)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:  # the client left while the file was being opened: close it once open
            opening.add_done_callback(lambda done: done.cancelled() or done.exception() or _close(done.result()))
            raise

    def _store(self) -> AdapterStore:
        if self.rt.store is None:
            raise NotServingError("the adapter store is starting (scanning its cache); retry shortly")
        return self.rt.store

    @staticmethod
    def _run(pool: Executor, fn: Callable, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def _close(file) -> None:
    if file is not None:
        file.close()


def _authorization(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


def add_to_server(servicer: AdapterStoreService, server) -> None:
    """Register the servicer like the generated add_..._to_server, except that a handler may yield bytes it
    serialized itself (FetchAdapter does: convert.fetch_chunk)."""
    handlers = {}
    for method in SERVICE.methods:
        request = getattr(adapter_store_pb2, method.input_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=request.FromString,
                                     response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _serialize(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


# -- errors -> status codes -------------------------------------------------------------------------

_CODES = [
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AdapterRejectedError, grpc.StatusCode.FAILED_PRECONDITION),
    (SourceUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (NotServingError, grpc.StatusCode.UNAVAILABLE),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
]


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for an exception raised while serving it."""
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error in the store ({type(error).__name__}: {error}); see its log"


def error_interceptor() -> ErrorInterceptor:
    """Exceptions from this service's handlers -> status codes (status_for), each logged once."""
    return ErrorInterceptor(SERVICE_NAME, status_for, log)
