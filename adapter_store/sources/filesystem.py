"""Adapters on the local filesystem: one directory (a registered `file://` URI or path), or a resolver root
where `<root>/<name>` is looked up on the first request (vLLM's filesystem resolver)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from adapter_store.errors import AdapterRejectedError, NotFoundError, SourceUnavailableError
from adapter_store.hashing import ADAPTER_FILES
from adapter_store.sources.base import AdapterSource, DownloadTarget, Fetched, Resolver
from service_kit.names import escape_from_root

COPY_BYTES = 4 << 20


class LocalDirSource(AdapterSource):
    def __init__(self, root: Path, confine: Path | None = None):
        """root: the adapter's directory. confine: a resolver root that its files must resolve inside
        (None for a directory an operator registered by path)."""
        self.root = Path(root).absolute()
        self.confine = confine
        self.uri = self.root.as_uri()

    def version(self) -> str:
        """sizes and mtimes of the adapter files: a rewrite gives a new version."""
        parts = []
        for name in ADAPTER_FILES:
            try:
                st = (self.root / name).stat()
            except OSError:
                return ""
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        return "mtime-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def download(self, target: DownloadTarget) -> Fetched:
        if not self.root.is_dir():
            raise NotFoundError(f"{target.what}: {self.root} is not a directory")
        try:
            listing = tuple(sorted(p.name for p in self.root.iterdir() if p.is_file()))
            version = self.version()
            present = [n for n in ADAPTER_FILES if n in listing]
            escape = escape_from_root(self.confine, self.root, present) if self.confine is not None else None
            if escape:
                raise AdapterRejectedError(f"{target.what}: {escape}; put the adapter's files under the root")
            target.check_size(sum((self.root / n).stat().st_size for n in present))
            target.progress.start(sum((self.root / n).stat().st_size for n in present))
            for name in present:
                _copy(self.root / name, target.dest / name, target.progress.advance)
        except PermissionError as e:
            raise SourceUnavailableError(f"{target.what}: cannot read {e.filename} ({e.strerror})") from None
        return Fetched(version=version, listing=listing)


class FilesystemResolver(Resolver):
    """`<root>/<name>` when it is a directory. Names are validated before they get here, so `<root>/<name>`
    stays under root; a symlink in it is followed only while it stays inside the root (a symlink out of the
    root, of the directory or of its files, is refused: FAILED_PRECONDITION)."""

    kind = "filesystem"

    def __init__(self, root: Path):
        self.root = Path(root).absolute()

    def find(self, key: str) -> AdapterSource | None:
        path = self.root / key
        return LocalDirSource(path, confine=self.root) if path.is_dir() else None


def _copy(src: Path, dst: Path, advance) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while data := fin.read(COPY_BYTES):
            fout.write(data)
            advance(len(data))
