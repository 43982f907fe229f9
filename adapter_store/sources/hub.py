"""Adapters on the Hugging Face Hub through huggingface_hub: `hf://org/repo[/subpath][@revision]`.
The library does the work: its own download cache (blobs keyed by etag, so a second resolve of an
unchanged repo downloads nothing), the token from the environment (HF_TOKEN or `hf auth login`), offline
mode (HF_HUB_OFFLINE=1: the cache only). As a resolver, only repos on an allow-list are looked up
(vLLM's VLLM_LORA_RESOLVER_HF_REPO_LIST): the Hub is somebody else's code and data."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from adapter_store.errors import InvalidArgumentError, NotFoundError, SourceUnavailableError
from adapter_store.hashing import ADAPTER_FILES
from adapter_store.sources.base import AdapterSource, DownloadTarget, Fetched, Resolver

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = re.compile(rf"^{_SEGMENT}/{_SEGMENT}$")
_SUBPATH = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT})*$")


@dataclass(frozen=True)
class HubSettings:
    # The library's cache directory; "" means its default (HF_HUB_CACHE / HF_HOME).
    cache_dir: str = ""
    # Revision used for names resolved on demand (a registered URI may pin its own with @revision).
    revision: str = "main"


def parse_hub_ref(ref: str) -> tuple[str, str, str]:
    """`org/repo[/subpath][@revision]` -> (repo_id, subpath, revision or "")."""
    body, _, revision = ref.partition("@")
    parts = body.strip("/").split("/")
    repo_id, subpath = "/".join(parts[:2]), "/".join(parts[2:])
    if not _REPO.match(repo_id) or (subpath and not _SUBPATH.match(subpath)) or ".." in body or "@" in revision:
        raise InvalidArgumentError(f"{ref!r} is not a Hub reference: expected org/repo[/subpath][@revision]")
    return repo_id, subpath, revision


class HubSource(AdapterSource):
    def __init__(self, settings: HubSettings, repo_id: str, subpath: str = "", revision: str = ""):
        self.settings = settings
        self.repo_id, self.subpath = repo_id, subpath
        self.revision = revision or settings.revision
        self.uri = f"hf://{repo_id}{'/' + subpath if subpath else ''}@{self.revision}"

    def download(self, target: DownloadTarget) -> Fetched:
        from huggingface_hub import snapshot_download

        prefix = f"{self.subpath}/" if self.subpath else ""
        self._check_size_online(prefix, target)
        try:
            snapshot = Path(snapshot_download(self.repo_id, revision=self.revision,
                                              cache_dir=self.settings.cache_dir or None,
                                              allow_patterns=[prefix + name for name in ADAPTER_FILES]))
        except Exception as e:
            raise _error(e, self.uri) from None
        root = snapshot / self.subpath if self.subpath else snapshot
        present = [n for n in ADAPTER_FILES if (root / n).is_file()]
        total = sum((root / n).stat().st_size for n in present)
        target.check_size(total)
        target.progress.start(total)
        for name in present:  # the library's cache holds symlinks to its blobs; copy the bytes
            shutil.copyfile(root / name, target.dest / name)
            target.progress.advance((root / name).stat().st_size)
        listing = tuple(present) if len(present) == len(ADAPTER_FILES) else self._listing(prefix, snapshot.name)
        return Fetched(version=snapshot.name, listing=listing)

    def _check_size_online(self, prefix: str, target: DownloadTarget) -> None:
        """Refuse an oversized adapter before the library downloads it (skipped offline or on error)."""
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return
        try:
            infos = HfApi().get_paths_info(self.repo_id, [prefix + n for n in ADAPTER_FILES], revision=self.revision)
        except Exception:  # snapshot_download reports the real problem with its own message
            return
        target.check_size(sum(getattr(i, "size", 0) or 0 for i in infos))

    def _listing(self, prefix: str, commit: str) -> tuple[str, ...]:
        """File names in the adapter's directory on the Hub (to explain a missing safetensors file)."""
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return ()
        try:
            files = HfApi().list_repo_files(self.repo_id, revision=commit)
        except Exception:
            return ()
        return tuple(sorted(f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]))


class HubResolver(Resolver):
    """A name that is an allow-listed `org/repo` resolves to the adapter at that repo's root."""

    kind = "hub"

    def __init__(self, settings: HubSettings, allowlist: tuple[str, ...]):
        self.settings = settings
        self.allowlist = frozenset(allowlist)

    def find(self, key: str) -> AdapterSource | None:
        return HubSource(self.settings, key) if key in self.allowlist else None


def check_repo_id(repo_id: str) -> str:
    if not _REPO.match(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id (org/repo)")
    return repo_id


def _error(e: Exception, uri: str) -> Exception:
    from huggingface_hub import errors

    if isinstance(e, errors.LocalEntryNotFoundError):  # offline (or unreachable) and not in the cache
        return SourceUnavailableError(f"{uri}: the Hub cannot be reached (offline?) and the library's cache does not "
                                      f"hold it ({e})")
    if isinstance(e, errors.GatedRepoError):
        return SourceUnavailableError(f"{uri}: the repo is gated; set HF_TOKEN to a token with access ({e})")
    if isinstance(e, errors.RepositoryNotFoundError | errors.RevisionNotFoundError | errors.EntryNotFoundError):
        return NotFoundError(f"{uri}: {type(e).__name__}: {e}")
    if isinstance(e, errors.HfHubHTTPError | OSError):
        return SourceUnavailableError(f"{uri}: the Hub failed ({type(e).__name__}: {e})")
    return e
