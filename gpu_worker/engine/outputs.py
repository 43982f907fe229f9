"""What the engine returns, in vLLM's shape (RequestOutput / CompletionOutput), plus the per-step delta
(new text and token ids) that a streaming server sends without diffing."""

from __future__ import annotations

from dataclasses import dataclass, field

from .lora_request import LoRARequest


@dataclass
class Logprob:
    token_id: int
    logprob: float
    # (token_id, logprob) of the most likely alternatives, most likely first.
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None  # "length", "stop", "abort"
    stop_reason: str | int | None = None
    # Added since the previous RequestOutput of this request.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[Logprob] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: LoRARequest | None = None
    # (name, content_hash) of the adapter version that served the request.
    adapter_key: tuple[str, str] | None = None


# A streamed output that carries its deltas alone, as a plain tuple: (request_id, delta_text, delta_token_ids,
# delta_logprobs). What an engine process sends its server a token (the totals come with the final output; the
# adapter's key came once, with the Add's result); an LLMEngine whose `wire_deltas` is set builds it in place of a
# RequestOutput (1.7 us less a token on the dev CPU), and gpu_worker.engine_core.from_wire makes the RequestOutput
# back.
DeltaOutput = tuple
