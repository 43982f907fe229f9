"""Names -> sources: pre-registered names (`name=uri`, or vLLM's JSON {"name", "path", "base_model_name"}),
then the resolvers, in the configured order. Runtime registrations (the Register RPC) are kept in
`<cache>/.state/registry.json`, so they survive a restart."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from adapter_store.errors import InvalidArgumentError, NotFoundError, SourceUnavailableError
from adapter_store.sources.base import AdapterSource, Resolver
from adapter_store.sources.filesystem import LocalDirSource
from adapter_store.sources.hub import HubSettings, HubSource, parse_hub_ref
from adapter_store.sources.s3 import S3Clients, S3Source, parse_s3_uri
from service_kit.names import parse_lora_module

log = logging.getLogger(__name__)
REGISTERED = "registered"


@dataclass(frozen=True)
class Registration:
    name: str
    uri: str
    base_model_name: str = ""
    # Registered through the RPC (kept across restarts) rather than from the configuration.
    runtime: bool = False

    @classmethod
    def parse(cls, spec: str | dict) -> Registration:
        """One LORA_MODULES entry: `name=uri` or {"name", "path", "base_model_name"}; ValueError if malformed."""
        name, uri, base = parse_lora_module(spec, value="uri")
        return cls(name, uri, base)


class SourceFactory:
    """Source URIs -> AdapterSource: s3://bucket/prefix/, hf://org/repo[/sub][@rev], file:///dir or a local
    directory, plugin:NAME/KEY, or a bare org/repo[/sub][@rev] (the Hub) when no such local directory exists."""

    def __init__(self, s3: S3Clients, hub: HubSettings, plugins: dict[str, Resolver]):
        self.s3, self.hub, self.plugins = s3, hub, plugins

    def from_uri(self, uri: str) -> AdapterSource:
        if uri.startswith("s3://"):
            bucket, prefix = parse_s3_uri(uri)
            return S3Source(self.s3, bucket, prefix)
        if uri.startswith("hf://"):
            return HubSource(self.hub, *parse_hub_ref(uri[len("hf://"):]))
        if uri.startswith("file://"):
            parsed = urlparse(uri)
            if parsed.netloc not in ("", "localhost"):
                raise InvalidArgumentError(f"{uri!r}: only local file:// URIs are supported")
            return LocalDirSource(Path(unquote(parsed.path)))
        if uri.startswith("plugin:"):
            name, _, key = uri[len("plugin:"):].partition("/")
            if name not in self.plugins:
                raise InvalidArgumentError(f"{uri!r}: resolver plugin {name!r} is not loaded (loaded: "
                                           f"{sorted(self.plugins) or 'none'}; see LORASERVE_STORE_PLUGINS)")
            return _PluginKey(self.plugins[name], name, key)
        if "://" in uri:
            raise InvalidArgumentError(f"{uri!r}: unsupported scheme; use s3://, hf://, file:// or plugin:NAME/...")
        path = Path(uri).expanduser()
        if uri.startswith(("/", "./", "../", "~")) or path.is_dir():
            return LocalDirSource(path)
        return HubSource(self.hub, *parse_hub_ref(uri))


class _PluginKey(AdapterSource):
    """A registered `plugin:NAME/KEY`: asks the plugin for KEY when it is downloaded."""

    def __init__(self, resolver: Resolver, name: str, key: str):
        self.resolver, self.key = resolver, key
        self.uri = f"plugin:{name}/{key}"

    def _source(self) -> AdapterSource:
        source = self.resolver.find(self.key)
        if source is None:
            raise NotFoundError(f"resolver plugin {self.resolver.kind!r} has no adapter {self.key!r}")
        return source

    def download(self, target):
        source = self._source()
        self.uri = source.uri or self.uri
        return source.download(target)


class Registry:
    """Thread-safe table of registered names, plus the resolvers to ask about the others."""

    def __init__(self, sources: SourceFactory, order: tuple[str, ...], resolvers: dict[str, Resolver],
                 configured: tuple[Registration, ...] = (), state_file: Path | None = None):
        self.sources = sources
        self.order = order
        self.resolvers = resolvers  # kind -> resolver, for the kinds that are configured
        self.state_file = state_file
        self._lock = threading.Lock()
        self._names = {r.name: r for r in configured}
        for reg in self._load():
            self._names[reg.name] = reg

    def get(self, name: str) -> Registration | None:
        with self._lock:
            return self._names.get(name)

    def all(self) -> list[Registration]:
        with self._lock:
            return sorted(self._names.values(), key=lambda r: r.name)

    def add(self, reg: Registration) -> None:
        with self._lock:
            self._names[reg.name] = reg
            self._save_locked()

    def remove(self, name: str) -> bool:
        with self._lock:
            found = self._names.pop(name, None) is not None
            self._save_locked()
            return found

    def find(self, name: str) -> tuple[AdapterSource, Registration | None]:
        """The source for `name`: its registration, else the first resolver that has it. A resolver that fails
        (its source unreachable) is skipped; if no other has the name, that failure is raised, else
        NotFoundError saying where it looked."""
        looked, failure = [], None
        for kind in self.order:
            if kind == REGISTERED:
                reg = self.get(name)
                if reg is not None:
                    return self.sources.from_uri(reg.uri), reg
                looked.append("registered names")
                continue
            resolver = self.resolvers.get(kind)
            if resolver is None:
                continue
            try:
                source = resolver.find(name)
            except SourceUnavailableError as e:
                log.warning("resolver %s failed for %r: %s", kind, name, e)
                failure = failure or e
                continue
            if source is not None:
                return source, None
            looked.append(f"the {kind} resolver")
        if failure is not None:
            raise failure
        where = ", ".join(looked) or "any source (none is configured)"
        raise NotFoundError(f"adapter {name!r} is unknown: not in {where}")

    def _load(self) -> list[Registration]:
        if self.state_file is None or not self.state_file.is_file():
            return []
        try:
            return [Registration(**r, runtime=True) for r in json.loads(self.state_file.read_text())["registrations"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable %s (%s): runtime registrations are lost", self.state_file, e)
            return []

    def _save_locked(self) -> None:
        if self.state_file is None:
            return
        regs = [{k: v for k, v in asdict(r).items() if k != "runtime"} for r in self._names.values() if r.runtime]
        tmp = self.state_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"registrations": sorted(regs, key=lambda r: r["name"])}, indent=1))
        os.replace(tmp, self.state_file)
