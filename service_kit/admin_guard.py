"""The guard on a service's admin RPCs: off unless enabled; when on, the request must carry
`authorization: Bearer <token>` metadata, compared in constant time. Each service subclasses it with its own
errors (its gRPC status mapping) and the message that says how to turn its admin RPCs on."""

from __future__ import annotations

import hmac


class AdminGuard:
    denied: type[Exception]  # raised while the admin RPCs are off (PERMISSION_DENIED)
    unauthenticated: type[Exception]  # raised on a missing or wrong token (UNAUTHENTICATED)
    disabled_message: str  # what `denied` says: how to turn them on

    def __init__(self, enabled: bool, token: str):
        if enabled and not token:
            raise ValueError("admin RPCs need a token")
        self.enabled = enabled
        self._token = token.encode()

    def check(self, authorization: str | None) -> None:
        """Return if `authorization` (the metadata value, or None) grants admin; raise otherwise."""
        if not self.enabled:
            raise self.denied(self.disabled_message)
        scheme, _, token = (authorization or "").strip().partition(" ")
        # compare_digest takes time independent of where the tokens differ (length aside)
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            raise self.unauthenticated("admin RPCs need the metadata 'authorization: Bearer <LORASERVE_ADMIN_TOKEN>'")
