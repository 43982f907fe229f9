"""Protobuf <-> domain types, at the edge: nothing past this module sees a *_pb2 type.

Incoming messages are checked here for what protobuf cannot say (sizes, the hash format, `optional`
fields left unset mean the default); the values themselves are checked by SamplingParams, whose
errors name the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gpu_worker.async_engine import AdapterResidency, EngineStatus
from gpu_worker.engine.chat_template import ChatPrompt
from gpu_worker.engine.errors import InvalidRequestError
from gpu_worker.engine.outputs import RequestOutput
from gpu_worker.engine.sampling_params import SamplingParams
from loraserve.v1 import common_pb2, worker_pb2

MAX_PROMPT_BYTES = 1024 * 1024
MAX_CHAT_MESSAGES = 4096
MAX_REQUEST_ID_CHARS = 256
_HASH = re.compile(r"^[0-9a-f]{64}$")
# proto3 `optional` fields: unset takes SamplingParams' default (vLLM's).
_OPTIONAL = ("max_tokens", "temperature", "top_p", "seed", "repetition_penalty", "logprobs")
_ALWAYS = ("top_k", "min_p", "ignore_eos", "presence_penalty", "frequency_penalty", "min_tokens")
_FLOATS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}

_FINISH = {
    "length": common_pb2.FINISH_REASON_LENGTH,
    "stop": common_pb2.FINISH_REASON_STOP,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
_RESIDENCY = {"gpu_slot": common_pb2.RESIDENCY_GPU_SLOT, "host_memory": common_pb2.RESIDENCY_HOST_MEMORY}
_STATE = {
    "starting": common_pb2.WORKER_STATE_STARTING,
    "serving": common_pb2.WORKER_STATE_SERVING,
    "draining": common_pb2.WORKER_STATE_DRAINING,
    "stopped": common_pb2.WORKER_STATE_DRAINING,
}


@dataclass(frozen=True)
class AdapterRef:
    name: str
    content_hash: str  # "" = whatever version the worker resolves


# -- incoming -------------------------------------------------------------------------------------


def sampling_params(pb: common_pb2.SamplingParams) -> SamplingParams:
    kwargs = {name: getattr(pb, name) for name in _OPTIONAL if pb.HasField(name)}
    kwargs.update({name: getattr(pb, name) for name in _ALWAYS})
    for name in _FLOATS & kwargs.keys():
        kwargs[name] = _f32(kwargs[name])
    kwargs["stop"] = list(pb.stop)
    kwargs["stop_token_ids"] = list(pb.stop_token_ids)
    # A stream sends deltas and the totals once, at the end: no per-step copy of the growing output.
    return SamplingParams(**kwargs, output_kind="delta")


def _f32(value: float) -> float:
    """The shortest decimal of a float32 (0.7, not 0.699999988): what the client wrote, for errors and seeds."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def prompt(pb: common_pb2.Prompt, max_model_len: int) -> str | list[int] | ChatPrompt:
    kind = pb.WhichOneof("kind")
    if kind == "text":
        text = pb.text
        # Chars <= bytes <= 4 * chars: encode only when the char count cannot decide.
        if len(text) > MAX_PROMPT_BYTES or (len(text) * 4 > MAX_PROMPT_BYTES and len(text.encode()) > MAX_PROMPT_BYTES):
            raise InvalidRequestError(f"prompt.text is over {MAX_PROMPT_BYTES} bytes; send at most 1 MiB of text")
        return text
    if kind == "token_ids":
        ids = pb.token_ids.ids
        if len(ids) > max_model_len:
            raise InvalidRequestError(f"prompt.token_ids has {len(ids)} ids; this worker's max_model_len is "
                                      f"{max_model_len}")
        return list(ids)
    if kind == "messages":
        return chat_prompt(pb.messages)
    raise InvalidRequestError("prompt is required: set prompt.text, prompt.token_ids or prompt.messages")


def chat_prompt(pb: common_pb2.ChatMessages) -> ChatPrompt:
    if not pb.messages:
        raise InvalidRequestError("prompt.messages is empty: send at least one message")
    if len(pb.messages) > MAX_CHAT_MESSAGES:
        raise InvalidRequestError(f"prompt.messages has {len(pb.messages)} messages; at most {MAX_CHAT_MESSAGES}")
    size = 0
    for i, m in enumerate(pb.messages):
        if not m.role or len(m.role) > 64:
            raise InvalidRequestError(f"prompt.messages[{i}].role must be a name like user, assistant or system")
        size += len(m.content.encode()) + len(m.role)
    if size > MAX_PROMPT_BYTES:
        raise InvalidRequestError(f"prompt.messages hold over {MAX_PROMPT_BYTES} bytes; send at most 1 MiB of text")
    return ChatPrompt(tuple({"role": m.role, "content": m.content} for m in pb.messages),
                      pb.continue_final_message)


def adapter_ref(pb, where: str = "adapter.") -> AdapterRef:
    """The adapter named by an AdapterRef (or EvictAdapterRequest, where="") . The name's pattern is checked by
    the adapter source; the hash format here."""
    if not pb.name:
        raise InvalidRequestError(f"{where}name must not be empty" + (" (leave adapter unset for the base model)"
                                                                       if where else ""))
    if pb.content_hash and not _HASH.match(pb.content_hash):
        raise InvalidRequestError(f"{where}content_hash must be 64 lowercase hex digits (sha256) or empty, got "
                                  f"{pb.content_hash[:80]!r}")
    return AdapterRef(pb.name, pb.content_hash)


def request_id(value: str) -> str:
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(f"request_id has {len(value)} characters; at most {MAX_REQUEST_ID_CHARS}")
    return value


def prefetch_target(value: int) -> str:
    """Where a prefetch should put the adapter: "host_memory" (the default) or "gpu_slot"."""
    if value in (common_pb2.RESIDENCY_UNSPECIFIED, common_pb2.RESIDENCY_HOST_MEMORY):
        return "host_memory"
    if value == common_pb2.RESIDENCY_GPU_SLOT:
        return "gpu_slot"
    name = common_pb2.Residency.Name(value) if value in common_pb2.Residency.values() else str(value)
    raise InvalidRequestError(f"target must be RESIDENCY_HOST_MEMORY or RESIDENCY_GPU_SLOT, got {name}")


# -- outgoing -------------------------------------------------------------------------------------


def generate_response(
    out: RequestOutput,
    request_id: str,
    first: bool,
    worker_id: str,
    token_text: Callable[[int], str],
) -> worker_pb2.StreamGenerateResponse:
    """One stream message from one engine output: its deltas; the adapter and worker on the first,
    finish reason and usage on the last."""
    c = out.outputs[0]
    msg = worker_pb2.StreamGenerateResponse(request_id=request_id, text_delta=c.delta_text,
                                            token_ids=c.delta_token_ids)
    for lp in c.delta_logprobs:
        msg.logprobs.append(common_pb2.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob,
            top=[common_pb2.TopLogprob(token_id=t, logprob=p, text=token_text(t)) for t, p in lp.top],
        ))
    if first:
        msg.worker_id = worker_id
        if out.adapter_key is not None:
            msg.adapter.name, msg.adapter.content_hash = out.adapter_key
    if out.finished:
        msg.finish_reason = _FINISH[c.finish_reason]
        msg.stop_reason = "" if c.stop_reason is None else str(c.stop_reason)
        msg.usage.prompt_tokens = len(out.prompt_token_ids)
        msg.usage.completion_tokens = len(c.token_ids)
    return msg


def error_response(request_id: str) -> worker_pb2.StreamGenerateResponse:
    """The last message of a stream that failed after it began; the status that follows says why."""
    return worker_pb2.StreamGenerateResponse(request_id=request_id, finish_reason=common_pb2.FINISH_REASON_ERROR)


def resident_adapter(r: AdapterResidency) -> common_pb2.ResidentAdapter:
    return common_pb2.ResidentAdapter(
        ref=common_pb2.AdapterRef(name=r.name, content_hash=r.content_hash),
        residency=_RESIDENCY[r.where],
        active_requests=r.active_requests,
        rank=r.rank,
    )


def worker_status(st: EngineStatus, worker_id: str, address: str) -> common_pb2.WorkerStatus:
    msg = common_pb2.WorkerStatus(worker_id=worker_id, address=address, state=_STATE[st.state])
    if st.info is not None:
        i = st.info
        msg.base_model, msg.device, msg.max_model_len = i.served_model_name, i.device, i.max_model_len
        msg.kv_blocks_total, msg.kv_block_size = i.kv_blocks_total, i.kv_block_size
        msg.max_loras, msg.max_cpu_loras, msg.max_lora_rank = i.max_loras, i.max_cpu_loras, i.max_lora_rank
    if st.load is not None:
        load = st.load
        msg.waiting_requests, msg.running_requests, msg.kv_blocks_free = load.waiting, load.running, load.kv_blocks_free
        msg.prefix_cache_queried_tokens = load.prefix_cache_queried_tokens
        msg.prefix_cache_hit_tokens = load.prefix_cache_hit_tokens
        msg.adapters.extend(resident_adapter(r) for r in load.adapters)
    return msg
