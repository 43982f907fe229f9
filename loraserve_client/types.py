"""What the client returns, as plain dataclasses, and the one place that maps them from and to protobuf."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import grpc

from loraserve.v1 import common_pb2, inference_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADDRESS_ENV = "LORASERVE_ADDRESS"
TOKEN_ENV = "LORASERVE_ADMIN_TOKEN"
# SamplingParams fields a caller may pass as keyword arguments (vLLM's names).
SAMPLING_FIELDS = {f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields}
_FINISH = {common_pb2.FINISH_REASON_LENGTH: "length", common_pb2.FINISH_REASON_STOP: "stop",
           common_pb2.FINISH_REASON_ABORT: "abort", common_pb2.FINISH_REASON_ERROR: "error"}
_KIND = {inference_pb2.MODEL_KIND_BASE: "base", inference_pb2.MODEL_KIND_ADAPTER: "adapter"}


class LoRAServeError(Exception):
    """A call that failed: `code` is the grpc.StatusCode, the message is the server's."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.details = message


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    worker_id: str = ""
    # The adapter version that served it (name, content hash); empty for the base model.
    adapter: str = ""
    adapter_hash: str = ""
    request_id: str = ""


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass(frozen=True)
class Model:
    id: str
    kind: str  # "base" or "adapter"
    parent: str = ""  # an adapter's base model
    content_hash: str = ""
    rank: int = 0
    max_model_len: int = 0
    extra: dict = field(default_factory=dict)


def address(value: str | None) -> str:
    return value or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def token(value: str | None) -> str:
    return value if value is not None else os.environ.get(TOKEN_ENV, "")


def error(e: grpc.RpcError) -> LoRAServeError:
    return LoRAServeError(e.code(), e.details() or "")


# text, token ids, or a conversation [{"role": ..., "content": ...}, ...]
PromptLike = str | list[int] | list[dict]


def prompt(value: PromptLike) -> common_pb2.Prompt:
    """Text, token ids, or a conversation [{"role", "content"}, ...] (the worker renders it with the model's
    chat template, as /v1/chat/completions does)."""
    if isinstance(value, str):
        return common_pb2.Prompt(text=value)
    value = list(value)
    if value and isinstance(value[0], dict):
        return common_pb2.Prompt(messages=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in value]))
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=value))


def sampling(params: dict) -> common_pb2.SamplingParams:
    unknown = set(params) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling parameters {sorted(unknown)}; known: {sorted(SAMPLING_FIELDS)}")
    return common_pb2.SamplingParams(**{k: v for k, v in params.items() if v is not None})


def generate_request(text: PromptLike, model: str, request_id: str, params: dict):
    return inference_pb2.GenerateRequest(request_id=request_id, model=model, prompt=prompt(text),
                                         sampling=sampling(params))


def stream_request(text: PromptLike, model: str, request_id: str, params: dict):
    return inference_pb2.GenerateStreamRequest(request_id=request_id, model=model, prompt=prompt(text),
                                               sampling=sampling(params))


def completion(r: inference_pb2.GenerateResponse) -> Completion:
    return Completion(r.text, list(r.token_ids), _FINISH.get(r.finish_reason), r.usage.prompt_tokens,
                      r.usage.completion_tokens, r.served_by.worker_id, r.served_by.adapter.name,
                      r.served_by.adapter.content_hash, r.request_id)


def chunk(r: inference_pb2.GenerateStreamResponse) -> Chunk:
    return Chunk(r.text_delta, list(r.token_ids), _FINISH.get(r.finish_reason), r.usage.completion_tokens)


def model(m: inference_pb2.ModelInfo) -> Model:
    return Model(m.id, _KIND.get(m.kind, "unknown"), m.parent, m.content_hash, m.rank, m.max_model_len)


def metadata(admin_token: str) -> tuple[tuple[str, str], ...]:
    if not admin_token:
        raise LoRAServeError(grpc.StatusCode.UNAUTHENTICATED,
                             f"admin calls need a token: pass token=... or set ${TOKEN_ENV}")
    return (("authorization", f"Bearer {admin_token}"),)


def load_request(name: str, source_uri: str, base_model_name: str, inplace: bool, warm: list[str] | None):
    return inference_pb2.LoadAdapterRequest(name=name, source_uri=source_uri, base_model_name=base_model_name,
                                            load_inplace=inplace, warm_worker_ids=list(warm or ()))
