"""StoreClient: the adapter store's API as the router uses it (resolve, list, register, delete). Translates at
the edge: domain types in and out, store statuses as router.errors (the same codes reach the client)."""

from __future__ import annotations

import grpc

from loraserve.v1 import adapter_store_pb2, adapter_store_pb2_grpc
from router import convert, errors
from router.domain import AdapterInfo
from service_kit.channels import aio_channel

# Resolve and Register may download and validate an adapter (S3, the Hub): give them time.
DOWNLOAD_TIMEOUT_S = 300.0
LIST_TIMEOUT_S = 10.0


class StoreClient:
    def __init__(self, address: str):
        self.address = address
        self._channel = aio_channel(address, options=[  # host:port, or xds:///name (proxyless mesh)
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000)])
        self._stub = adapter_store_pb2_grpc.AdapterStoreServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def resolve(self, name: str, timeout: float | None = DOWNLOAD_TIMEOUT_S) -> AdapterInfo:
        reply = await self._call(self._stub.ResolveAdapter, adapter_store_pb2.ResolveAdapterRequest(name=name),
                                 timeout)
        return convert.adapter_info(reply.manifest)

    async def list(self) -> list[AdapterInfo]:
        reply = await self._call(self._stub.ListAdapters, adapter_store_pb2.ListAdaptersRequest(), LIST_TIMEOUT_S)
        return [convert.adapter_info(m) for m in reply.adapters]

    async def register(self, name: str, source_uri: str, base_model_name: str, replace: bool,
                       authorization: str | None) -> AdapterInfo:
        req = adapter_store_pb2.RegisterAdapterRequest(name=name, source_uri=source_uri,
                                                       base_model_name=base_model_name, replace=replace)
        reply = await self._call(self._stub.RegisterAdapter, req, DOWNLOAD_TIMEOUT_S, authorization)
        return convert.adapter_info(reply.manifest)

    async def delete(self, name: str, authorization: str | None) -> None:
        await self._call(self._stub.DeleteAdapter, adapter_store_pb2.DeleteAdapterRequest(name=name),
                         LIST_TIMEOUT_S, authorization)

    async def _call(self, method, request, timeout: float | None, authorization: str | None = None):
        # the client's admin token goes on to the store, which checks it too
        metadata = (("authorization", authorization),) if authorization else None
        try:
            return await method(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            error = convert.error_from_rpc(e, f"the adapter store at {self.address}")
            if isinstance(error, errors.WorkerLostError):
                error = errors.UnavailableError(str(error))
            raise error from None
