"""Our exceptions -> gRPC status codes, for the one interceptor every service uses
(service_kit.interceptor.ErrorInterceptor: maps what handlers raise and logs each error once)."""

from __future__ import annotations

import logging

import grpc

from router.errors import RouterError
from service_kit.interceptor import ErrorInterceptor

log = logging.getLogger(__name__)


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, RouterError):
        return grpc.StatusCode[error.code], str(error)
    return grpc.StatusCode.INTERNAL, f"internal error in the router ({type(error).__name__}: {error}); see its log"


def error_interceptor(service_name: str) -> ErrorInterceptor:
    return ErrorInterceptor(service_name, status_for, log)
