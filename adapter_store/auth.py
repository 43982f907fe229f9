"""The guard on admin RPCs (Register, Delete): off unless enabled; when on, the request must carry
`authorization: Bearer <token>` metadata, compared in constant time."""

from __future__ import annotations

import hmac

from adapter_store.errors import PermissionDeniedError, UnauthenticatedError


class AdminGuard:
    def __init__(self, enabled: bool, token: str):
        if enabled and not token:
            raise ValueError("admin RPCs need a token")
        self.enabled = enabled
        self._token = token.encode()

    def check(self, authorization: str | None) -> None:
        """Return if `authorization` (the metadata value, or None) grants admin; raise otherwise."""
        if not self.enabled:
            raise PermissionDeniedError("admin RPCs are disabled on this store: start it with --enable-admin "
                                        "(LORASERVE_STORE_ENABLE_ADMIN=true) and LORASERVE_ADMIN_TOKEN")
        scheme, _, token = (authorization or "").strip().partition(" ")
        # compare_digest takes time independent of where the tokens differ (length aside)
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            raise UnauthenticatedError("admin RPCs need the metadata 'authorization: Bearer <LORASERVE_ADMIN_TOKEN>'")
