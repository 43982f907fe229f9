"""Helpers behind the conftest fixtures: ports, the moto S3 server, uploads, Redis connection/cleanup, polling.

Kept out of conftest.py so tests and scripts can import them directly (``from tests.services import ...``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# Dummy credentials for moto; the config-file vars point nowhere so a developer's real AWS profile
# can never be picked up by a test.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}
AWS_UNSET_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


class S3Adapters(NamedTuple):
    endpoint: str
    bucket: str
    prefixes: dict[str, str]  # adapter name -> key prefix ("adapters/<name>/")


class HubCache(NamedTuple):
    cache_dir: Path
    repo_id: str  # adapter files at the repo root
    subfolder_repo_id: str  # adapter files under `subfolder/`
    subfolder: str
    adapter_name: str  # which fixture adapter repo_id holds
    subfolder_adapter_name: str  # which fixture adapter subfolder_repo_id holds


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (racy by nature; prefer binding port 0 where possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_moto_server(host: str = "127.0.0.1", port: int = 0):
    """Start moto's standalone S3-compatible server in a thread; return ``(server, "http://host:port")``.

    ``port=0`` lets the kernel choose atomically; the real port is read back from the bound socket.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    bound_host, bound_port = server.get_host_and_port()
    return server, f"http://{bound_host}:{bound_port}"


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=AWS_TEST_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
    )


def upload_dir(client, bucket: str, prefix: str, src_dir: str | Path) -> list[str]:
    """Upload every file under ``src_dir`` to ``s3://bucket/prefix<relative path>``; return the keys."""
    keys = []
    src = Path(src_dir)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(src).as_posix()
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        keys.append(key)
    return keys


def connect_redis(url: str = DEFAULT_REDIS_URL):
    """Connect and PING; raise RuntimeError with a clear message if no Redis answers."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise RuntimeError(
            f"No Redis answered at {url} ({exc!r}). The test suite needs a real Redis: start one "
            f"(e.g. `redis-server --port 6379 --save '' --daemonize yes`) or set REDIS_URL."
        ) from exc
    return client


def delete_prefix(client, prefix: str) -> int:
    """Delete every key starting with ``prefix``; return how many were deleted."""
    keys = list(client.scan_iter(match=_glob_escape(prefix) + "*", count=500))
    return client.delete(*keys) if keys else 0


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def wait_until(check: Callable[[], object], timeout: float = 10.0, interval: float = 0.02):
    """Poll `check` until it returns something truthy; return that, or the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
