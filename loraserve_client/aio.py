"""AsyncClient: Client's methods as coroutines, on grpc.aio (create it inside a running event loop)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from loraserve.v1 import inference_pb2, inference_pb2_grpc

from . import types as t


class AsyncClient:
    def __init__(self, address: str | None = None, token: str | None = None, timeout: float | None = 120.0):
        self.address = t.address(address)
        self._token = t.token(token)
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, prompt: t.PromptLike, model: str = "", request_id: str = "",
                       **sampling) -> t.Completion:
        try:
            return t.completion(await self._stub.Generate(t.generate_request(prompt, model, request_id, sampling),
                                                          timeout=self.timeout))
        except grpc.RpcError as e:
            raise t.error(e) from None

    async def stream(self, prompt: t.PromptLike, model: str = "", request_id: str = "",
                     **sampling) -> AsyncIterator[t.Chunk]:
        call = self._stub.GenerateStream(t.stream_request(prompt, model, request_id, sampling), timeout=self.timeout)
        try:
            async for msg in call:
                yield t.chunk(msg)
        except grpc.RpcError as e:
            raise t.error(e) from None
        finally:
            call.cancel()

    async def models(self) -> list[t.Model]:
        try:
            reply = await self._stub.ListModels(inference_pb2.ListModelsRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise t.error(e) from None
        return [t.model(m) for m in reply.models]

    async def load(self, name: str, source_uri: str, base_model_name: str = "", inplace: bool = False,
                   warm_worker_ids: list[str] | None = None) -> t.Model:
        try:
            reply = await self._stub.LoadAdapter(
                t.load_request(name, source_uri, base_model_name, inplace, warm_worker_ids),
                metadata=t.metadata(self._token), timeout=self.timeout)
        except grpc.RpcError as e:
            raise t.error(e) from None
        return t.model(reply.adapter)

    async def unload(self, name: str) -> None:
        try:
            await self._stub.UnloadAdapter(inference_pb2.UnloadAdapterRequest(name=name),
                                           metadata=t.metadata(self._token), timeout=self.timeout)
        except grpc.RpcError as e:
            raise t.error(e) from None
