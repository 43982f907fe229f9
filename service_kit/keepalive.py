"""HTTP/2 keepalive between the router and its workers, both sides in one place: the router pings each worker
channel so a host that vanished without closing its connections (a partition, a frozen process) is noticed in
seconds rather than when TCP gives up (minutes); workers accept those pings."""

from __future__ import annotations


def client_options(interval_s: float) -> list[tuple[str, int]]:
    """Channel options: a ping every `interval_s` (also with no call open), the connection dropped when one
    goes unanswered for as long. 0: no keepalive. (gRPC 1.85 times a ping out by ping_timeout_ms, not only
    keepalive_timeout_ms, and spaces pings without data by min_time_between_pings_ms, 5 minutes by default:
    without both, a frozen worker was noticed only when it woke; with them, after 2 x interval.)"""
    if interval_s <= 0:
        return []
    ms = max(1, int(interval_s * 1000))
    return [("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", ms),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_time_between_pings_ms", ms), ("grpc.http2.ping_timeout_ms", ms)]


def server_options() -> list[tuple[str, int]]:
    """Server options that accept a router's pings (gRPC's defaults answer pings more often than every five
    minutes with GOAWAY "too_many_pings", which would drop the router's status stream)."""
    return [("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_ping_interval_without_data_ms", 500),
            ("grpc.http2.max_ping_strikes", 0)]
