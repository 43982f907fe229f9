"""WorkerService: the gRPC servicer (thin: translate, delegate to AsyncEngine, translate back) and the one
interceptor that turns our exceptions into status codes."""

from __future__ import annotations

import asyncio
import logging

import grpc

from gpu_worker import convert
from gpu_worker.adapters import LocalAdapterSource, StoreAdapterSource, check_adapter_name
from gpu_worker.async_engine import LORA_OFF, AsyncEngine, UnavailableError, merge_outputs
from gpu_worker.engine.errors import AdapterError, CapacityError, InvalidRequestError
from gpu_worker.engine.lora_request import LoRARequest
from loraserve.v1 import worker_pb2, worker_pb2_grpc
from service_kit.interceptor import ErrorInterceptor

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
# WatchStatus never pushes more often than this, whatever interval_ms the client asks for.
MIN_STATUS_INTERVAL_MS = 10


class WorkerService(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, engine: AsyncEngine, adapters: LocalAdapterSource | StoreAdapterSource, enable_lora: bool,
                 worker_id: str, address: str, status_interval_ms: int, stream_interval: int = 1):
        self.engine = engine
        self.stream_interval = stream_interval
        self.adapters = adapters
        self.enable_lora = enable_lora
        self.worker_id = worker_id
        self.address = address
        self.status_interval_ms = status_interval_ms

    async def StreamGenerate(self, request, context):
        self._require_serving()
        info = self.engine.status().info
        rid = convert.request_id(request.request_id)
        prompt = convert.prompt(request.prompt, info.max_model_len)
        params = convert.sampling_params(request.sampling)
        ref = convert.adapter_ref(request.adapter) if request.HasField("adapter") else None
        lora = await self._lora(ref)
        stream = await self.engine.generate(prompt, params, lora, ref.content_hash if ref else "", rid)
        sent, held = False, []
        try:
            async for out in stream:
                # After the first message, outputs are held until they carry stream_interval tokens (or end).
                held.append(out)
                if sent and not out.finished and sum(len(o.outputs[0].delta_token_ids) for o in held) \
                        < self.stream_interval:
                    continue
                out, held = merge_outputs(held), []
                yield convert.generate_response(out, rid, not sent, self.worker_id, self.engine.token_text)
                sent = True
        except Exception:
            if sent:  # the client has tokens: end the stream with ERROR; the status (from the interceptor) says why
                if held:  # the tokens held back for the interval first
                    yield convert.generate_response(merge_outputs(held), rid, False, self.worker_id,
                                                    self.engine.token_text)
                yield convert.error_response(rid)
            raise
        finally:
            stream.close()

    async def PrefetchAdapter(self, request, context):
        ref = convert.adapter_ref(request.adapter)
        convert.prefetch_target(request.target)  # GPU_SLOT: loaded into host memory; it takes a slot when scheduled
        resident = await self.engine.prefetch(await self._lora(ref), ref.content_hash)
        return worker_pb2.PrefetchAdapterResponse(adapter=convert.resident_adapter(resident))

    async def EvictAdapter(self, request, context):
        ref = convert.adapter_ref(request, where="")
        check_adapter_name(ref.name)
        return worker_pb2.EvictAdapterResponse(evicted=await self.engine.evict(ref.name, ref.content_hash))

    async def GetStatus(self, request, context):
        return worker_pb2.GetStatusResponse(status=self._status())

    async def WatchStatus(self, request, context):
        interval = max(request.interval_ms or self.status_interval_ms, MIN_STATUS_INTERVAL_MS) / 1000
        last = None
        while True:
            st = self.engine.status()
            msg = self._status(st)
            if msg != last:
                yield worker_pb2.WatchStatusResponse(status=msg)
                last = msg
                if st.state == "stopped":
                    return
                await asyncio.sleep(interval)
            await self.engine.wait_changed(st.version)

    # -- helpers ----------------------------------------------------------------------------------

    def _status(self, st=None):
        return convert.worker_status(st or self.engine.status(), self.worker_id, self.address)

    def _require_serving(self) -> None:
        state = self.engine.state
        if state == "starting":
            raise UnavailableError("the worker is starting (loading and warming up the model); retry shortly")
        if state != "serving":
            raise UnavailableError("the worker is draining before it stops; send the request to another worker")

    async def _lora(self, ref: convert.AdapterRef | None) -> LoRARequest | None:
        if ref is None:
            return None
        check_adapter_name(ref.name)
        if not self.enable_lora:
            raise AdapterError("unsupported", LORA_OFF)
        return await self.adapters.resolve(ref.name, ref.content_hash)


# -- errors -> status codes -------------------------------------------------------------------------


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for an exception raised while serving it."""
    if isinstance(error, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, AdapterError):
        code = grpc.StatusCode.NOT_FOUND if error.kind == "not_found" else grpc.StatusCode.FAILED_PRECONDITION
        return code, str(error)
    if isinstance(error, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error on the worker ({type(error).__name__}: {error}); see its log"


def error_interceptor() -> ErrorInterceptor:
    """Exceptions from this service's handlers -> status codes (status_for), each logged once."""
    return ErrorInterceptor(SERVICE_NAME, status_for, log)
