"""The router's exceptions. Each is one gRPC status code; the interceptor (router/interceptor.py) maps them,
so domain code raises these and never touches grpc. Errors from workers and the store arrive as these too
(their clients translate the status at the edge)."""

from __future__ import annotations


class RouterError(Exception):
    """Base class; `code` names the gRPC status (grpc.StatusCode.<code>)."""

    code = "INTERNAL"


class InvalidArgumentError(RouterError):
    code = "INVALID_ARGUMENT"


class NotFoundError(RouterError):
    code = "NOT_FOUND"


class AlreadyExistsError(RouterError):
    code = "ALREADY_EXISTS"


class FailedPreconditionError(RouterError):
    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(RouterError):
    code = "RESOURCE_EXHAUSTED"


class UnavailableError(RouterError):
    code = "UNAVAILABLE"


class DeadlineExceededError(RouterError):
    code = "DEADLINE_EXCEEDED"


class CancelledError(RouterError):
    code = "CANCELLED"


class PermissionDeniedError(RouterError):
    code = "PERMISSION_DENIED"


class UnauthenticatedError(RouterError):
    code = "UNAUTHENTICATED"


class OutOfRangeError(RouterError):
    code = "OUT_OF_RANGE"


class InternalError(RouterError):
    code = "INTERNAL"


class WorkerLostError(UnavailableError):
    """The connection to a worker broke (it died, or the network did): not the worker's answer."""


BY_CODE: dict[str, type[RouterError]] = {
    cls.code: cls
    for cls in (InvalidArgumentError, NotFoundError, AlreadyExistsError, FailedPreconditionError,
                ResourceExhaustedError, UnavailableError, DeadlineExceededError, CancelledError,
                PermissionDeniedError, UnauthenticatedError, OutOfRangeError, InternalError)
}

# What a worker may answer for one request that another worker may not: try the next one (before the first
# token). UNAVAILABLE: draining, starting, unreachable; RESOURCE_EXHAUSTED: its queue is full.
RETRYABLE = (UnavailableError, ResourceExhaustedError)
