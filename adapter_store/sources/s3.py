"""Adapters in S3 (or MinIO, or anything S3-compatible): `s3://bucket/prefix/` holds the adapter's files.
boto3 with the standard credential chain (environment, profile, instance role), a configurable endpoint
URL, standard-mode retries, and the transfer manager (ranged, parallel GETs) for large files. As a resolver,
a name maps to `s3://<bucket>/<prefix><name>/`."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from adapter_store.errors import InvalidArgumentError, NotFoundError, SourceUnavailableError
from adapter_store.hashing import ADAPTER_FILES, DigestingWriter
from adapter_store.sources.base import AdapterSource, DownloadTarget, Fetched, Resolver

_NOT_FOUND = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str = ""
    # Retries per request, botocore's "standard" mode (backoff, retry on throttling and 5xx).
    max_attempts: int = 5
    # Transfer manager: files over the threshold are fetched as parallel ranged GETs of chunksize.
    multipart_threshold: int = 8 << 20
    multipart_chunksize: int = 8 << 20
    max_concurrency: int = 10


class S3Clients:
    """One boto3 client (thread-safe) and transfer config, made on first use so the store starts without S3."""

    def __init__(self, settings: S3Settings):
        self.settings = settings
        self._client = None
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                s = self.settings
                config = Config(retries={"max_attempts": s.max_attempts, "mode": "standard"},
                                max_pool_connections=max(10, s.max_concurrency))
                self._client = boto3.session.Session().client("s3", endpoint_url=s.endpoint_url or None,
                                                              config=config)
            return self._client

    def transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        return TransferConfig(multipart_threshold=s.multipart_threshold, multipart_chunksize=s.multipart_chunksize,
                              max_concurrency=s.max_concurrency)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix/` -> (bucket, "prefix/"); the prefix always ends in "/" (a directory)."""
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket or any(p in (".", "..") for p in prefix.split("/")):
        raise InvalidArgumentError(f"{uri!r} is not an s3://bucket/prefix/ URI")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Source(AdapterSource):
    def __init__(self, clients: S3Clients, bucket: str, prefix: str, listing: dict | None = None):
        self.clients = clients
        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}"
        self._listing = listing

    def list(self) -> dict[str, tuple[int, str]]:
        """file name -> (size, etag) of the objects directly under the prefix."""
        if self._listing is not None:
            listing, self._listing = self._listing, None  # use a resolver's listing once, then ask again
            return listing
        out = {}
        try:
            pages = self.clients.client().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/")
            for page in pages:
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(self.prefix):]] = (obj["Size"], obj.get("ETag", "").strip('"'))
        except Exception as e:
            raise _error(e, self.uri) from None
        return out

    def version(self) -> str:
        listing = self.list()
        self._listing = listing
        return _version(listing)

    def download(self, target: DownloadTarget) -> Fetched:
        listing = self.list()
        if not listing:
            raise NotFoundError(f"{target.what}: no objects under {self.uri}")
        present = [n for n in ADAPTER_FILES if n in listing]
        total = sum(listing[n][0] for n in present)
        target.check_size(total)
        target.progress.start(total)
        from boto3.s3.transfer import create_transfer_manager

        files = {name: open(target.dest / name, "wb") for name in present}  # noqa: SIM115 (closed below)
        writers = {name: DigestingWriter(f) for name, f in files.items()}
        try:
            # Both files at once through one transfer manager. The sizes are known from the listing, so no
            # HEAD request per file; DigestingWriter (no seek) makes the manager write in order, hashing as
            # the bytes arrive, while its ranged GETs still run in parallel.
            with create_transfer_manager(self.clients.client(), self.clients.transfer_config()) as manager:
                futures = {name: manager.download(self.bucket, self.prefix + name, writers[name],
                                                  subscribers=[_Known(listing[name][0], target.progress.advance)])
                           for name in present}
                for name, future in futures.items():
                    try:
                        future.result()
                    except Exception as e:
                        raise _error(e, self.uri + name) from None
        finally:
            for f in files.values():
                f.close()
        digests = {name: w.digester.result() for name, w in writers.items()}
        return Fetched(version=_version(listing), listing=tuple(sorted(listing)), digests=digests)


class _Known:
    """A transfer subscriber: the object's size (known from the listing) and progress callbacks."""

    def __init__(self, size: int, advance):
        self.size, self.advance = size, advance

    def on_queued(self, future, **kwargs):
        future.meta.provide_transfer_size(self.size)

    def on_progress(self, future, bytes_transferred, **kwargs):
        self.advance(bytes_transferred)

    def on_done(self, future, **kwargs):
        pass


class S3Resolver(Resolver):
    kind = "s3"

    def __init__(self, clients: S3Clients, bucket: str, prefix: str = ""):
        self.clients, self.bucket = clients, bucket
        prefix = prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""

    def find(self, key: str) -> AdapterSource | None:
        source = S3Source(self.clients, self.bucket, f"{self.prefix}{key}/")
        listing = source.list()
        return S3Source(self.clients, self.bucket, source.prefix, listing) if listing else None


def _version(listing: dict[str, tuple[int, str]]) -> str:
    return ",".join(f"{n}@{listing[n][1]}" for n in ADAPTER_FILES if n in listing)


def _error(e: Exception, where: str) -> Exception:
    """botocore's exceptions -> ours: a missing bucket or key is NOT_FOUND, the rest is the source failing."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND:
            return NotFoundError(f"{where}: {code}")
        return SourceUnavailableError(f"{where}: S3 refused the request ({code}: {e})")
    if isinstance(e, NoCredentialsError):
        return SourceUnavailableError(f"{where}: no AWS credentials found (environment, profile or instance role)")
    if isinstance(e, BotoCoreError | RetriesExceededError | OSError):
        return SourceUnavailableError(f"{where}: S3 is unreachable ({e})")
    return e
