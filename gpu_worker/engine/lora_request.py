"""LoRARequest: how a caller names an adapter, as in vLLM's offline API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for one request.

    `lora_name` is what users see; `lora_int_id` is the caller's integer id (unique per adapter, > 0), kept
    for vLLM compatibility; the engine keys its caches on (name, content hash), never on the id alone, so a
    reloaded adapter under the same id never serves a request meant for the old one.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

    def __post_init__(self):
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")
        if self.lora_int_id <= 0:
            raise ValueError(f"lora_int_id must be > 0, got {self.lora_int_id}")
        if not self.lora_path:
            raise ValueError("lora_path must not be empty")
