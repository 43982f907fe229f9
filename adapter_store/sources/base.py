"""The one small interface every source implements (filesystem, Hub, S3, and plugins alike).

A Resolver turns a key (an adapter name on demand, or the rest of a `plugin:NAME/...` URI) into an
AdapterSource, or None when it has no such adapter. An AdapterSource downloads the adapter's files into
an empty directory. Sources do no validation: the store validates the directory before caching it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

from adapter_store.errors import AdapterRejectedError
from adapter_store.progress import Progress


@dataclass
class DownloadTarget:
    """Where and how much to download."""

    # An empty directory: write adapter_config.json and adapter_model.safetensors (those that exist) here.
    dest: Path
    # "adapter 'name' (uri)", for messages.
    what: str
    # Refuse before downloading when the source knows the sizes up front (check_size does it).
    max_bytes: int
    progress: Progress = field(default_factory=lambda: Progress("download"))

    def check_size(self, total: int) -> None:
        if total > self.max_bytes:
            raise AdapterRejectedError(f"{self.what} is {total} bytes, over the store's limit of {self.max_bytes} "
                                       "(max_adapter_bytes)")


@dataclass(frozen=True)
class Fetched:
    """What a download found."""

    # The source's version of what it downloaded: etags, a commit sha, sizes and mtimes. Informational, and
    # used to skip a download when the cache already holds that version.
    version: str = ""
    # Names of every file in the adapter's directory at the source (downloaded or not), so a missing
    # safetensors file can be explained (a pickle-only adapter).
    listing: tuple[str, ...] = ()
    # Optional: path -> (sha256, chunk digests) computed while writing (hashing.DigestingWriter), so the
    # store need not read the file again. The store hashes every file missing here itself.
    digests: dict[str, tuple[str, list[str]]] = field(default_factory=dict)


class AdapterSource(abc.ABC):
    """One adapter at one place. `uri` goes into the manifest (file://, s3://, hf://, plugin:NAME/...)."""

    uri: str = ""

    def version(self) -> str:
        """The source's current version without downloading, or "" when it cannot tell cheaply."""
        return ""

    @abc.abstractmethod
    def download(self, target: DownloadTarget) -> Fetched:
        """Write the adapter's files into target.dest. Raise NotFoundError when it is not there,
        SourceUnavailableError when the source cannot be reached, AdapterRejectedError for a size over
        target.max_bytes known up front. Called on a worker thread; may block."""


class Resolver(abc.ABC):
    """Finds adapters by name on the first request (vLLM's LoRA resolvers)."""

    # How RESOLVERS names it: "filesystem", "hub", "s3", or the plugin's entry-point name.
    kind: str = ""

    @abc.abstractmethod
    def find(self, key: str) -> AdapterSource | None:
        """The adapter's source if this resolver has it, else None. `key` is a validated adapter name
        (or, for a plugin, the part after `plugin:NAME/` of a registered URI). May block briefly."""
