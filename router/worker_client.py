"""WorkerClient: one worker's WorkerService over one gRPC channel (HTTP/2 multiplexes the status stream and
every request). Translates at the edge: domain types in, domain types and router.errors out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from loraserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from router import convert
from router.domain import AdapterRef, Delta, Payload, Residency, WorkerStatus
from service_kit import keepalive

# Replies are small; this only bounds what a confused peer can make us buffer.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CONTROL_TIMEOUT_S = 30.0
_STATUS_REQUEST = worker_pb2.GetStatusRequest()


class WorkerClient:
    def __init__(self, address: str, keepalive_s: float = 0.0):
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # a worker that restarts on the same address is dialled again at once, not after a long backoff
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            *keepalive.client_options(keepalive_s),
        ])
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def get_status(self, timeout: float = CONTROL_TIMEOUT_S) -> WorkerStatus:
        try:
            reply = await self._stub.GetStatus(_STATUS_REQUEST, timeout=timeout)
        except grpc.RpcError as e:
            raise convert.error_from_rpc(e, f"worker {self.address}") from None
        return convert.worker_status(reply.status)

    async def watch_status(self, interval_ms: int) -> AsyncIterator[WorkerStatus]:
        """The worker's status whenever it changes; raises a router error when the stream breaks."""
        call = self._stub.WatchStatus(worker_pb2.WatchStatusRequest(interval_ms=interval_ms))
        try:
            async for msg in call:
                yield convert.worker_status(msg.status)
        except grpc.RpcError as e:
            raise convert.error_from_rpc(e, f"worker {self.address}") from None
        finally:
            call.cancel()

    async def generate(self, request_id: str, payload: Payload, adapter: AdapterRef | None,
                       timeout: float | None) -> AsyncIterator[Delta]:
        """Stream one request's deltas. Leaving the iteration early (the client cancelled, or a deadline)
        cancels the worker's call, which aborts the request there and frees its KV blocks and slot."""
        call = self._stub.StreamGenerate(convert.stream_generate_request(request_id, payload, adapter),
                                         timeout=timeout, metadata=mesh_metadata(request_id, adapter))
        try:
            async for msg in call:
                yield convert.delta(msg)
        except grpc.RpcError as e:
            raise convert.error_from_rpc(e, f"worker {self.address}") from None
        finally:
            call.cancel()  # a no-op once the call has ended

    async def prefetch(self, ref: AdapterRef, target: Residency = Residency.HOST_MEMORY,
                       timeout: float = CONTROL_TIMEOUT_S) -> Residency:
        req = worker_pb2.PrefetchAdapterRequest(adapter=common_pb2.AdapterRef(name=ref.name,
                                                                              content_hash=ref.content_hash),
                                                target=convert.residency_pb(target))
        try:
            reply = await self._stub.PrefetchAdapter(req, timeout=timeout)
        except grpc.RpcError as e:
            raise convert.error_from_rpc(e, f"worker {self.address}") from None
        return convert.residency(reply.adapter.residency)

    async def evict(self, name: str, content_hash: str = "", timeout: float = CONTROL_TIMEOUT_S) -> int:
        try:
            reply = await self._stub.EvictAdapter(worker_pb2.EvictAdapterRequest(name=name, content_hash=content_hash),
                                                  timeout=timeout)
        except grpc.RpcError as e:
            raise convert.error_from_rpc(e, f"worker {self.address}") from None
        return reply.evicted


ADAPTER_HEADER = "x-lora-adapter"
REQUEST_ID_HEADER = "x-request-id"


def mesh_metadata(request_id: str, adapter: AdapterRef | None) -> tuple[tuple[str, str], ...]:
    """What a service mesh sees on each call to a worker: the request id, and the adapter's name (none for a
    base-model request, so a mesh's consistent hash on it spreads those). The router builds these itself;
    nothing a client sent is passed on, so a client cannot steer a worker choice made on the header. A mesh
    may hash on it for locality (docs: deploy/README.md); it must not authorize on it."""
    if adapter is None:
        return ((REQUEST_ID_HEADER, request_id),)
    return ((REQUEST_ID_HEADER, request_id), (ADAPTER_HEADER, adapter.name))
