"""Errors the engine raises to its callers.

InvalidRequestError is also a ValueError so code that only knows the standard hierarchy still
treats a bad request as bad input rather than as an engine failure.
"""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine refuses as given; the message says which field and why."""


class AdapterError(EngineError):
    """An adapter that cannot be served. `kind` is one of: not_found (no such adapter or file),
    invalid (unreadable or malformed), unsupported (contents the engine cannot apply), mismatch (made for
    another base model), rank (over max_lora_rank), too_large (over the size limit)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class CapacityError(EngineError):
    """The engine cannot take the request now (queue full) or ever (longer than its KV capacity)."""
