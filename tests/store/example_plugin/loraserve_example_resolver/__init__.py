"""An example adapter-store resolver plugin: adapters kept as `<root>/<name>/<version>/` directories,
the highest version served (versions compare as numbers when they are numbers: 2 < 10).

It uses only the store's plugin API (adapter_store.sources): a factory taking a PluginContext, a Resolver
whose find() returns an AdapterSource or None, and an AdapterSource whose download() writes the files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from adapter_store.errors import NotFoundError
from adapter_store.sources import AdapterSource, DownloadTarget, Fetched, Resolver

FILES = ("adapter_config.json", "adapter_model.safetensors")


class VersionedDirSource(AdapterSource):
    def __init__(self, root: Path, key: str, version: str):
        self.dir = root / key / version
        self.key, self._version = key, version
        self.uri = f"plugin:versioned-dir/{key}@{version}"

    def version(self) -> str:
        return self._version

    def download(self, target: DownloadTarget) -> Fetched:
        if not self.dir.is_dir():
            raise NotFoundError(f"{target.what}: {self.dir} is gone")
        present = [f for f in FILES if (self.dir / f).is_file()]
        target.check_size(sum((self.dir / f).stat().st_size for f in present))
        for f in present:
            shutil.copyfile(self.dir / f, target.dest / f)
            target.progress.advance((target.dest / f).stat().st_size)
        return Fetched(version=self._version, listing=tuple(sorted(p.name for p in self.dir.iterdir())))


class VersionedDirResolver(Resolver):
    def __init__(self, root: Path):
        self.root = root

    def find(self, key: str) -> AdapterSource | None:
        versions = [p.name for p in (self.root / key).iterdir() if p.is_dir()] if (self.root / key).is_dir() else []
        if not versions:
            return None
        newest = max(versions, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))
        return VersionedDirSource(self.root, key, newest)


def make_resolver(context) -> Resolver:
    """The entry point: context.options is this plugin's entry of LORASERVE_STORE_PLUGIN_OPTIONS."""
    root = context.options.get("root")
    if not root or not Path(root).is_dir():
        raise ValueError(f"option 'root' must name a directory, got {root!r}")
    return VersionedDirResolver(Path(root))
