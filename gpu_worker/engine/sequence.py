"""One request's state inside the engine, from admission to finish."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: Any  # SamplingParams
    # (name, content_hash) of the adapter, or None for the base model.
    adapter_key: tuple[str, str] | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache. Behind num_tokens by the prompt (or a chunk of it) before
    # prefill and by one token between decode steps.
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    # Device slot of the adapter while running; -1 for the base model or while waiting.
    slot: int = -1
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Tokens sampled by a step still running on the device (async scheduling): counted in num_tokens, so the
    # next step is scheduled before the host knows them; their ids come from the device (ModelRunner).
    pending: int = 0
    # Prefix cache: the leading blocks of block_table that are cached, and the serial of the last of them.
    prefix_known: int = 0
    prefix_parent: int = 0
    # Per-request state owned by the engine (detokenizer, RNG, stop matcher), opaque here.
    state: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.pending

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host has: num_tokens less the pending ones."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output (end <= num_known_tokens)."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
