"""The guard on the store's admin RPCs (Register, Delete): service_kit's, with the store's errors."""

from __future__ import annotations

from adapter_store.errors import PermissionDeniedError, UnauthenticatedError
from service_kit import admin_guard


class AdminGuard(admin_guard.AdminGuard):
    denied, unauthenticated = PermissionDeniedError, UnauthenticatedError
    disabled_message = ("admin RPCs are disabled on this store: start it with --enable-admin "
                        "(LORASERVE_STORE_ENABLE_ADMIN=true) and LORASERVE_ADMIN_TOKEN")
