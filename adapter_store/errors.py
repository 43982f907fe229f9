"""What the store raises on purpose. The service's one interceptor maps each class to a status code
(service.status_for); domain code never imports grpc."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose; the message is what the client reads."""


class InvalidArgumentError(StoreError):
    """A request the store refuses as given: a name that is not a name, a malformed URI. INVALID_ARGUMENT."""


class NotFoundError(StoreError):
    """No source has the adapter, or no such version or file. NOT_FOUND."""


class AdapterRejectedError(StoreError):
    """The adapter exists but failed validation (not LoRA, DoRA, pickle-only, shapes, rank, size, base model).
    FAILED_PRECONDITION. Nothing of it is cached."""


class SourceUnavailableError(StoreError):
    """The source could not be reached or refused us (network, credentials, offline Hub). UNAVAILABLE."""


class AlreadyExistsError(StoreError):
    """Register without replace for a name that is taken. ALREADY_EXISTS."""


class OutOfRangeError(StoreError):
    """A Fetch offset past the end of the file. OUT_OF_RANGE."""


class PermissionDeniedError(StoreError):
    """An admin RPC while admin RPCs are disabled. PERMISSION_DENIED."""


class UnauthenticatedError(StoreError):
    """An admin RPC without the right bearer token. UNAUTHENTICATED."""


class NotServingError(StoreError):
    """The store is starting or draining. UNAVAILABLE."""
