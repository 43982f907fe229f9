"""The store's domain types: what an adapter is once validated (Manifest) and its lifecycle state.
Plain dataclasses with a JSON form (the cache keeps one per entry); convert.py maps them to protobuf."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, replace

from service_kit.peft_config import ConfigSummary


class State(enum.Enum):
    REGISTERED = "registered"  # known by name, not downloaded yet
    DOWNLOADING = "downloading"
    READY = "ready"  # validated and cached
    FAILED = "failed"  # the last attempt failed; `error` says why


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    # sha256 over the raw digests of the file's CHUNK_BYTES chunks (hashing.chunk_root); "" if unknown.
    chunk_root: str = ""


@dataclass(frozen=True)
class Manifest:
    name: str
    content_hash: str = ""
    source_uri: str = ""
    source_version: str = ""
    base_model_name: str = ""
    config: ConfigSummary | None = None
    files: tuple[FileEntry, ...] = ()
    state: State = State.READY
    error: str = ""

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    def with_state(self, state: State, error: str = "") -> Manifest:
        return replace(self, state=state, error=error)

    def to_json(self) -> dict:
        out = asdict(self)
        out["state"] = self.state.value
        return out

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        """The inverse of to_json; KeyError / TypeError / ValueError on anything malformed."""
        cfg = data.get("config")
        config = None
        if cfg is not None:
            config = ConfigSummary(**{**cfg, "target_modules": tuple(cfg["target_modules"])})
        return cls(
            name=data["name"],
            content_hash=data["content_hash"],
            source_uri=data["source_uri"],
            source_version=data["source_version"],
            base_model_name=data["base_model_name"],
            config=config,
            files=tuple(FileEntry(**f) for f in data["files"]),
            state=State(data["state"]),
            error=data.get("error", ""),
        )
