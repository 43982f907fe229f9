"""Protobuf <-> domain types, at the edge. Only this module, the servicer and the two clients (worker_client,
store_client) import *_pb2; everything else works on router.domain."""

from __future__ import annotations

import grpc

from loraserve.v1 import common_pb2, inference_pb2, worker_pb2
from router import errors
from router.domain import (
    AdapterInfo,
    AdapterRef,
    AdapterState,
    ClusterStatus,
    Delta,
    ModelEntry,
    Residency,
    ResidentAdapter,
    Usage,
    WorkerState,
    WorkerStatus,
)

_RESIDENCY = {
    common_pb2.RESIDENCY_GPU_SLOT: Residency.GPU_SLOT,
    common_pb2.RESIDENCY_HOST_MEMORY: Residency.HOST_MEMORY,
    common_pb2.RESIDENCY_LOADING: Residency.LOADING,
}
_RESIDENCY_PB = {v: k for k, v in _RESIDENCY.items()}
_WORKER_STATE = {
    common_pb2.WORKER_STATE_STARTING: WorkerState.STARTING,
    common_pb2.WORKER_STATE_SERVING: WorkerState.SERVING,
    common_pb2.WORKER_STATE_DRAINING: WorkerState.DRAINING,
}
_WORKER_STATE_PB = {v: k for k, v in _WORKER_STATE.items()}
_ADAPTER_STATE = {
    common_pb2.ADAPTER_STATE_REGISTERED: AdapterState.REGISTERED,
    common_pb2.ADAPTER_STATE_DOWNLOADING: AdapterState.DOWNLOADING,
    common_pb2.ADAPTER_STATE_READY: AdapterState.READY,
    common_pb2.ADAPTER_STATE_FAILED: AdapterState.FAILED,
}
_ADAPTER_STATE_PB = {v: k for k, v in _ADAPTER_STATE.items()}
_FINISH = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}
_FINISH_PB = {v: k for k, v in _FINISH.items()}
# Connection-level failures: the worker did not answer, so this says nothing about the request.
_LOST_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN)


# -- errors ---------------------------------------------------------------------------------------


def error_from_rpc(e: grpc.RpcError, who: str) -> errors.RouterError:
    """A status a worker or the store answered (or a broken connection to it) -> our exception."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else "") or ""
    if code in _LOST_CODES and _connection_failure(details):
        return errors.WorkerLostError(f"{who} is unreachable or went away ({details})")
    cls = errors.BY_CODE.get(code.name, errors.InternalError)
    if cls is errors.InternalError and code is not grpc.StatusCode.INTERNAL:
        return errors.InternalError(f"{who} failed with {code.name}: {details}")
    return cls(details or f"{who} answered {code.name}")


def _connection_failure(details: str) -> bool:
    low = details.lower()
    return any(s in low for s in ("connect", "socket closed", "connection reset", "goaway", "stream removed",
                                  "broken pipe", "end of tcp stream", "recvmsg", "dns resolution"))


# -- worker API -----------------------------------------------------------------------------------


def adapter_ref(pb: common_pb2.AdapterRef) -> AdapterRef:
    return AdapterRef(pb.name, pb.content_hash)


def worker_status(pb: common_pb2.WorkerStatus) -> WorkerStatus:
    return WorkerStatus(
        worker_id=pb.worker_id, address=pb.address, state=_WORKER_STATE.get(pb.state, WorkerState.UNSPECIFIED),
        base_model=pb.base_model, device=pb.device, waiting_requests=pb.waiting_requests,
        running_requests=pb.running_requests, kv_blocks_total=pb.kv_blocks_total,
        kv_blocks_free=pb.kv_blocks_free, kv_block_size=pb.kv_block_size, max_loras=pb.max_loras,
        max_cpu_loras=pb.max_cpu_loras, max_lora_rank=pb.max_lora_rank, max_model_len=pb.max_model_len,
        prefix_cache_queried_tokens=pb.prefix_cache_queried_tokens, prefix_cache_hit_tokens=pb.prefix_cache_hit_tokens,
        adapters=tuple(ResidentAdapter(adapter_ref(a.ref), _RESIDENCY.get(a.residency, Residency.LOADING),
                                       a.active_requests, a.rank) for a in pb.adapters),
    )


def worker_status_pb(s: WorkerStatus) -> common_pb2.WorkerStatus:
    return common_pb2.WorkerStatus(
        worker_id=s.worker_id, address=s.address, state=_WORKER_STATE_PB.get(s.state, 0), base_model=s.base_model,
        device=s.device, waiting_requests=s.waiting_requests, running_requests=s.running_requests,
        kv_blocks_total=s.kv_blocks_total, kv_blocks_free=s.kv_blocks_free, kv_block_size=s.kv_block_size,
        max_loras=s.max_loras, max_cpu_loras=s.max_cpu_loras, max_lora_rank=s.max_lora_rank,
        max_model_len=s.max_model_len, prefix_cache_queried_tokens=s.prefix_cache_queried_tokens,
        prefix_cache_hit_tokens=s.prefix_cache_hit_tokens,
        adapters=[common_pb2.ResidentAdapter(
            ref=common_pb2.AdapterRef(name=a.ref.name, content_hash=a.ref.content_hash),
            residency=_RESIDENCY_PB[a.residency], active_requests=a.active_requests, rank=a.rank) for a in s.adapters],
    )


def stream_generate_request(request_id: str, payload, adapter: AdapterRef | None) -> worker_pb2.StreamGenerateRequest:
    msg = worker_pb2.StreamGenerateRequest(request_id=request_id, prompt=payload.prompt, sampling=payload.sampling)
    if adapter is not None:
        msg.adapter.name = adapter.name
        msg.adapter.content_hash = adapter.content_hash
    return msg


def delta(pb: worker_pb2.StreamGenerateResponse) -> Delta:
    usage = Usage(pb.usage.prompt_tokens, pb.usage.completion_tokens) if pb.HasField("usage") else None
    return Delta(
        text=pb.text_delta, token_ids=pb.token_ids, logprobs=pb.logprobs,
        finish_reason=_FINISH.get(pb.finish_reason), stop_reason=pb.stop_reason, usage=usage,
        worker_id=pb.worker_id, adapter=adapter_ref(pb.adapter) if pb.HasField("adapter") else None,
    )


def residency(value: int) -> Residency:
    return _RESIDENCY.get(value, Residency.LOADING)


def residency_pb(target: Residency) -> int:
    return _RESIDENCY_PB[target]


# -- public API -----------------------------------------------------------------------------------


def stream_response(request_id: str, d: Delta) -> inference_pb2.GenerateStreamResponse:
    msg = inference_pb2.GenerateStreamResponse(request_id=request_id, text_delta=d.text, token_ids=d.token_ids,
                                               logprobs=d.logprobs, stop_reason=d.stop_reason)
    if d.finish_reason is not None:
        msg.finish_reason = _FINISH_PB[d.finish_reason]
    if d.usage is not None:
        msg.usage.prompt_tokens, msg.usage.completion_tokens = d.usage.prompt_tokens, d.usage.completion_tokens
    if d.worker_id:
        _served_by(msg.served_by, d)
    return msg


def unary_response(request_id: str, deltas: list[Delta]) -> inference_pb2.GenerateResponse:
    token_ids: list[int] = []
    for d in deltas:
        token_ids.extend(d.token_ids)
    msg = inference_pb2.GenerateResponse(request_id=request_id, text="".join(d.text for d in deltas),
                                         token_ids=token_ids)
    for d in deltas:
        if d.logprobs:
            msg.logprobs.extend(d.logprobs)
        if d.worker_id:
            _served_by(msg.served_by, d)
    last = deltas[-1]
    if last.finish_reason is not None:
        msg.finish_reason = _FINISH_PB[last.finish_reason]
    msg.stop_reason = last.stop_reason
    if last.usage is not None:
        msg.usage.prompt_tokens, msg.usage.completion_tokens = last.usage.prompt_tokens, last.usage.completion_tokens
    return msg


def error_stream_response(request_id: str) -> inference_pb2.GenerateStreamResponse:
    """The last message of a stream that failed after it began; the status that follows says why."""
    return inference_pb2.GenerateStreamResponse(request_id=request_id, finish_reason=common_pb2.FINISH_REASON_ERROR)


def _served_by(pb: inference_pb2.ServedBy, d: Delta) -> None:
    pb.worker_id = d.worker_id
    if d.adapter is not None:
        pb.adapter.name, pb.adapter.content_hash = d.adapter.name, d.adapter.content_hash


def cluster_status(s: ClusterStatus) -> inference_pb2.GetClusterStatusResponse:
    return inference_pb2.GetClusterStatusResponse(workers=[worker_status_pb(w) for w in s.workers],
                                                   base_model=s.base_model)


def model_info(m: ModelEntry) -> inference_pb2.ModelInfo:
    if m.adapter is None:
        return inference_pb2.ModelInfo(id=m.id, kind=inference_pb2.MODEL_KIND_BASE, max_model_len=m.max_model_len,
                                       state=common_pb2.ADAPTER_STATE_READY)
    a = m.adapter
    return inference_pb2.ModelInfo(id=a.name, kind=inference_pb2.MODEL_KIND_ADAPTER, parent=m.base_model,
                                   root=a.source_uri, content_hash=a.content_hash,
                                   state=_ADAPTER_STATE_PB.get(a.state, 0), rank=a.rank,
                                   max_model_len=m.max_model_len, created=a.created)


# -- adapter store API ----------------------------------------------------------------------------


def adapter_info(m: common_pb2.AdapterManifest) -> AdapterInfo:
    return AdapterInfo(name=m.ref.name, content_hash=m.ref.content_hash, source_uri=m.source_uri,
                       base_model=m.base_model_name, rank=m.config.max_rank or m.config.rank,
                       state=_ADAPTER_STATE.get(m.state, AdapterState.UNSPECIFIED))
