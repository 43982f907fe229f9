"""An adapter-store resolver plugin: adapters kept in S3 as `s3://<bucket>/<prefix><name>/v<N>/`, the highest
N served, so publishing `v3/` makes the next resolve of a name take the new version (a reload elsewhere).

The store's plugin API only (adapter_store.sources): a factory `make_resolver(context)`, a Resolver whose
find(name) returns an AdapterSource or None, and an AdapterSource whose download() writes the files into
target.dest. The store validates what it wrote (PEFT config, safetensors header), hashes and caches it.
Options (LORASERVE_STORE_PLUGIN_OPTIONS["s3-versions"]): bucket (required), prefix, endpoint_url, region.
Credentials come from boto3's standard chain.
"""

from __future__ import annotations

import re

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from adapter_store.errors import NotFoundError, SourceUnavailableError
from adapter_store.sources import AdapterSource, DownloadTarget, Fetched, Resolver

FILES = ("adapter_config.json", "adapter_model.safetensors")
_VERSION = re.compile(r"^v(\d+)/$")


class S3VersionSource(AdapterSource):
    def __init__(self, s3, bucket: str, prefix: str, objects: dict[str, tuple[str, int]]):
        """objects: file name -> (etag, size) under the version's prefix."""
        self.s3, self.bucket, self.prefix, self.objects = s3, bucket, prefix, objects
        self.uri = f"s3://{bucket}/{prefix}"

    def version(self) -> str:
        return ",".join(f"{name}={etag}" for name, (etag, _) in sorted(self.objects.items()))

    def download(self, target: DownloadTarget) -> Fetched:
        target.check_size(sum(size for name, (_, size) in self.objects.items() if name in FILES))
        for name in FILES:
            try:
                self.s3.download_file(self.bucket, self.prefix + name, str(target.dest / name))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    continue  # the store says which file is missing and why
                raise SourceUnavailableError(f"{target.what}: {e}") from None
            except BotoCoreError as e:
                raise SourceUnavailableError(f"{target.what}: {e}") from None
            target.progress.advance((target.dest / name).stat().st_size)
        return Fetched(version=self.version(), listing=tuple(f for f in FILES if (target.dest / f).exists()))


class S3VersionsResolver(Resolver):
    def __init__(self, s3, bucket: str, prefix: str):
        self.s3, self.bucket, self.prefix = s3, bucket, prefix

    def find(self, key: str) -> AdapterSource | None:
        base = f"{self.prefix}{key}/"
        try:
            listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=base, Delimiter="/")
            versions = [int(m.group(1)) for p in listing.get("CommonPrefixes", [])
                        if (m := _VERSION.match(p["Prefix"][len(base):]))]
            if not versions:
                return None
            prefix = f"{base}v{max(versions)}/"
            objects = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])
        except (ClientError, BotoCoreError) as e:
            raise SourceUnavailableError(f"s3://{self.bucket}/{base}: {e}") from None
        found = {o["Key"][len(prefix):]: (o["ETag"].strip('"'), o["Size"]) for o in objects}
        if not any(f in found for f in FILES):
            raise NotFoundError(f"s3://{self.bucket}/{prefix} holds no adapter files")
        return S3VersionSource(self.s3, self.bucket, prefix, found)


def make_resolver(context) -> Resolver:
    options = context.options
    if not options.get("bucket"):
        raise ValueError("option 'bucket' is required")
    s3 = boto3.client("s3", endpoint_url=options.get("endpoint_url") or None,
                      region_name=options.get("region") or "us-east-1")
    return S3VersionsResolver(s3, options["bucket"], options.get("prefix", ""))
