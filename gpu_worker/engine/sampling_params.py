"""Per-request sampling parameters, with vLLM's names and defaults.

Validation happens once, at construction, so the sampler and the detokenizer can trust every field.
Each error names the field, the rule and the value, so a client can fix the request without reading
this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from gpu_worker.engine.errors import InvalidRequestError


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `max_tokens=True` is a client bug, not the number 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(name: str, rule: str, value: object) -> InvalidRequestError:
    return InvalidRequestError(f"{name} must be {rule}, got {value!r}")


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop; field names and defaults follow vLLM.

    `top_k` 0 or -1 turns top-k off; `seed` None samples from the engine's shared RNG, an int makes
    the request reproducible whatever else is in the batch. `stop` may be given as one string.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # What each RequestOutput before the last carries, as vLLM's RequestOutputKind: "cumulative" (every
    # token and the text so far, plus the deltas) or "delta" (only the deltas, text and token_ids empty: no
    # per-step copy of a growing list or string, which costs O(tokens) a step per request); "final_only":
    # there is none before the last (LLM.generate's: no output built a step per request). The last output is
    # always cumulative.
    output_kind: str = "cumulative"

    # Limits bound the per-step work one request can cause (stop-string scans, top-k gathers).
    MAX_STOP_STRINGS: ClassVar[int] = 16
    MAX_STOP_STRING_CHARS: ClassVar[int] = 256
    MAX_STOP_TOKEN_IDS: ClassVar[int] = 256
    MAX_LOGPROBS: ClassVar[int] = 20
    MAX_PENALTY: ClassVar[float] = 2.0
    MAX_SEED: ClassVar[int] = 2**63  # exclusive; torch.Generator.manual_seed takes a signed 64-bit value
    # Below this temperature sampling is argmax, as in vLLM (dividing by ~0 would overflow anyway).
    GREEDY_TEMPERATURE: ClassVar[float] = 1e-5

    def __post_init__(self) -> None:
        self._check_lengths()
        self._check_distribution()
        self._check_penalties()
        self._check_stops()
        self._check_flags()

    @property
    def is_greedy(self) -> bool:
        """True when the request takes the argmax token at every step."""
        return self.temperature < self.GREEDY_TEMPERATURE

    def _check_lengths(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _fail("max_tokens", "an integer >= 1", self.max_tokens)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise _fail("min_tokens", "an integer >= 0", self.min_tokens)
        if self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= self.MAX_LOGPROBS
        ):
            raise _fail("logprobs", f"None or an integer in [0, {self.MAX_LOGPROBS}]", self.logprobs)

    def _check_distribution(self) -> None:
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise _fail("temperature", ">= 0 and finite", self.temperature)
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:  # NaN fails the comparison too
            raise _fail("top_p", "in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _fail("top_k", "-1 or 0 (off) or an integer >= 1", self.top_k)
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise _fail("min_p", "in [0, 1]", self.min_p)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < self.MAX_SEED):
            raise _fail("seed", "None or an integer in [0, 2**63)", self.seed)
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.min_p = float(self.min_p)

    def _check_penalties(self) -> None:
        rp = self.repetition_penalty
        if not _is_number(rp) or not math.isfinite(rp) or rp <= 0:
            raise _fail("repetition_penalty", "> 0 and finite", rp)
        self.repetition_penalty = float(rp)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -self.MAX_PENALTY <= value <= self.MAX_PENALTY:
                raise _fail(name, f"in [-{self.MAX_PENALTY:g}, {self.MAX_PENALTY:g}]", value)
            setattr(self, name, float(value))

    def _check_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise _fail("stop", "a string or a list of strings", stop)
        if len(stop) > self.MAX_STOP_STRINGS:
            raise _fail("stop", f"at most {self.MAX_STOP_STRINGS} strings", f"{len(stop)} strings")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise _fail("stop", "a list of non-empty strings", s)
            if len(s) > self.MAX_STOP_STRING_CHARS:
                rule = f"strings of at most {self.MAX_STOP_STRING_CHARS} characters"
                raise _fail("stop", rule, f"{len(s)} characters")
        # A private copy: a caller mutating its list later must not change a validated request.
        self.stop = list(stop)

        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise _fail("stop_token_ids", "a list of integers", ids)
        if len(ids) > self.MAX_STOP_TOKEN_IDS:
            raise _fail("stop_token_ids", f"at most {self.MAX_STOP_TOKEN_IDS} ids", f"{len(ids)} ids")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise _fail("stop_token_ids", "a list of integers >= 0", t)
        self.stop_token_ids = list(ids)

    def _check_flags(self) -> None:
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "a bool", getattr(self, name))
        if self.output_kind not in ("cumulative", "delta", "final_only"):
            raise _fail("output_kind", '"cumulative", "delta" or "final_only"', self.output_kind)
