"""Client: the blocking client of loraserve.v1.InferenceService (one channel, thread-safe)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from loraserve.v1 import inference_pb2, inference_pb2_grpc

from . import types as t


class Client:
    def __init__(self, address: str | None = None, token: str | None = None, timeout: float | None = 120.0):
        """address: host:port of the router (default $LORASERVE_ADDRESS or 127.0.0.1:50051); token: the
        admin bearer token (default $LORASERVE_ADMIN_TOKEN); timeout: seconds per call (None: no deadline)."""
        self.address = t.address(address)
        self._token = t.token(token)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.address)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: t.PromptLike, model: str = "", request_id: str = "", **sampling) -> t.Completion:
        """One completion. `prompt`: text, token ids, or a conversation [{"role", "content"}, ...] (rendered with
        the model's chat template). `model`: an adapter's name, or the base model's (or "" for the base).
        `sampling`: SamplingParams fields by vLLM's names (max_tokens, temperature, top_p, stop, seed, ...)."""
        try:
            return t.completion(self._stub.Generate(t.generate_request(prompt, model, request_id, sampling),
                                                    timeout=self.timeout))
        except grpc.RpcError as e:
            raise t.error(e) from None

    def stream(self, prompt: t.PromptLike, model: str = "", request_id: str = "", **sampling) -> Iterator[t.Chunk]:
        """The completion as it is generated: text deltas (the last chunk has the finish reason)."""
        call = self._stub.GenerateStream(t.stream_request(prompt, model, request_id, sampling), timeout=self.timeout)
        try:
            for msg in call:
                yield t.chunk(msg)
        except grpc.RpcError as e:
            raise t.error(e) from None
        finally:
            call.cancel()

    def models(self) -> list[t.Model]:
        """The base model and every adapter (with its base model as `parent`), as vLLM's /v1/models."""
        try:
            reply = self._stub.ListModels(inference_pb2.ListModelsRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise t.error(e) from None
        return [t.model(m) for m in reply.models]

    def load(self, name: str, source_uri: str, base_model_name: str = "", inplace: bool = False,
             warm_worker_ids: list[str] | None = None) -> t.Model:
        """Register an adapter (admin). inplace: replace the version a name serves (in-flight requests finish
        on the old one)."""
        try:
            reply = self._stub.LoadAdapter(t.load_request(name, source_uri, base_model_name, inplace, warm_worker_ids),
                                           metadata=t.metadata(self._token), timeout=self.timeout)
        except grpc.RpcError as e:
            raise t.error(e) from None
        return t.model(reply.adapter)

    def unload(self, name: str) -> None:
        """Forget an adapter everywhere (admin)."""
        try:
            self._stub.UnloadAdapter(inference_pb2.UnloadAdapterRequest(name=name), metadata=t.metadata(self._token),
                                     timeout=self.timeout)
        except grpc.RpcError as e:
            raise t.error(e) from None
