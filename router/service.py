"""InferenceService: the public API's servicer. Thin: translate the request, delegate (dispatcher, catalog,
admin, registry), translate the answer. Errors are raised as router.errors; the interceptor maps them."""

from __future__ import annotations

import contextlib
import itertools
import os

from loraserve.v1 import inference_pb2, inference_pb2_grpc
from router import convert, errors
from router.admin import AdapterAdmin
from router.catalog import AdapterCatalog
from router.dispatcher import Dispatcher
from router.domain import ClusterStatus, GenerationRequest, LoadRequest, ModelEntry, Payload
from router.registry import WorkerRegistry

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
MAX_REQUEST_ID_CHARS = 256
# Ids for requests that come without one: a random per-process prefix and a counter (uuid4 costs more, and
# these only need to be unique across the router's replicas and restarts, not unguessable).
_ID_PREFIX = os.urandom(6).hex()


class InferenceService(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, dispatcher: Dispatcher, catalog: AdapterCatalog, admin: AdapterAdmin,
                 registry: WorkerRegistry):
        self._ids = itertools.count(1)
        self.dispatcher = dispatcher
        self.catalog = catalog
        self.admin = admin
        self.registry = registry

    async def Generate(self, request, context):
        req = self._generation(request, context, buffered=True)
        return convert.unary_response(req.request_id, await self.dispatcher.generate(req))

    async def GenerateStream(self, request, context):
        req = self._generation(request, context, buffered=False)
        sent = ended = False
        try:
            async with contextlib.aclosing(self.dispatcher.stream(req)) as deltas:
                async for d in deltas:
                    ended = d.finish_reason is not None
                    yield convert.stream_response(req.request_id, d)
                    sent = True
        except errors.RouterError:
            if sent and not ended:
                yield convert.error_stream_response(req.request_id)  # then the status says why
            raise

    async def ListModels(self, request, context):
        models = await self.catalog.list_models()
        return inference_pb2.ListModelsResponse(models=[convert.model_info(m) for m in models])

    async def LoadAdapter(self, request, context):
        req = LoadRequest(request.name, request.source_uri, request.base_model_name, request.load_inplace,
                          tuple(request.warm_worker_ids))
        info = await self.admin.load(req, _authorization(context))
        entry = ModelEntry(info.name, self.catalog.base_model(), info, self.catalog.max_model_len())
        return inference_pb2.LoadAdapterResponse(adapter=convert.model_info(entry))

    async def UnloadAdapter(self, request, context):
        await self.admin.unload(request.name, _authorization(context))
        return inference_pb2.UnloadAdapterResponse()

    async def GetClusterStatus(self, request, context):
        return convert.cluster_status(ClusterStatus(self.registry.published, self.catalog.base_model()))

    def _generation(self, request, context, buffered: bool) -> GenerationRequest:
        return self.generation_request(request, context.time_remaining(), buffered)

    def generation_request(self, request, timeout: float | None, buffered: bool) -> GenerationRequest:
        """A GenerateRequest (from gRPC, or from the HTTP front) checked and given an id."""
        if request.prompt.WhichOneof("kind") is None:
            raise errors.InvalidArgumentError(
                "prompt is required: set prompt.text, prompt.token_ids or prompt.messages")
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise errors.InvalidArgumentError(f"request_id has {len(request.request_id)} characters; at most "
                                              f"{MAX_REQUEST_ID_CHARS}")
        request_id = request.request_id or f"{_ID_PREFIX}-{next(self._ids)}"
        return GenerationRequest(request_id=request_id, model=request.model,
                                 payload=Payload(request.prompt, request.sampling), timeout=timeout,
                                 buffered=buffered)


def _authorization(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None
