"""Client channels: plaintext by default (no control plane needed); through xDS when the target is an
`xds:///name` (proxyless service mesh: the control plane supplies the endpoints, load balancing and, when it
configures them, mTLS credentials, falling back to plaintext otherwise). xDS needs GRPC_XDS_BOOTSTRAP (or
GRPC_XDS_BOOTSTRAP_CONFIG) set, as grpcio documents; without it every call fails with a status that says so.

Serving through xDS (server-side credentials from the control plane) is in grpcio's synchronous API only, not
in grpc.aio, which every service here uses: in a proxyless deployment the servers accept plaintext, so keep
them on a trusted network (or give them a sidecar for inbound traffic)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

XDS_SCHEME = "xds:"


def is_xds(target: str) -> bool:
    return target.startswith(XDS_SCHEME)


def aio_channel(target: str, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`: host:port (plaintext) or xds:///name[:port] (through xDS)."""
    if is_xds(target):
        credentials = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
        return grpc.aio.secure_channel(target, credentials, options=list(options))
    return grpc.aio.insecure_channel(target, options=list(options))
