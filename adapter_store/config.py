"""StoreConfig: the adapter store's one typed configuration, built once in __main__ from flags and environment.

Every field `foo_bar` is the flag `--foo-bar` and, when the flag is absent, the variable
`LORASERVE_STORE_FOO_BAR` (docker-compose.yml sets those). Flags win over the environment; the environment
wins over the defaults here. Two exceptions: the admin token comes only from LORASERVE_ADMIN_TOKEN (a flag
would show it in `ps`), and enable_admin falls back to LORASERVE_ENABLE_RUNTIME_LORA_UPDATING.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from adapter_store.base_model import BaseModelShapes
from adapter_store.registry import Registration
from adapter_store.sources.hub import HubSettings, check_repo_id
from adapter_store.sources.s3 import S3Settings
from adapter_store.validation import BaseModel, Limits

ENV_PREFIX = "LORASERVE_STORE_"
ADMIN_TOKEN_ENV = "LORASERVE_ADMIN_TOKEN"
SHARED_ADMIN_ENV = "LORASERVE_ENABLE_RUNTIME_LORA_UPDATING"
RESOLVER_KINDS = ("registered", "filesystem", "hub", "s3", "plugins")
GiB = 1 << 30


def _default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraserve" / "adapters")


@dataclass(frozen=True)
class StoreConfig:
    host: str = "0.0.0.0"
    # 0: let the OS pick a free port; the store prints the one it got.
    port: int = 50052
    cache_dir: str = field(default_factory=_default_cache_dir)
    # LRU by bytes: the least recently used versions go when a new one would pass this.
    cache_max_bytes: int = 20 * GiB
    max_adapter_bytes: int = 2 * GiB
    max_lora_rank: int = 64
    # Pre-registered names: name=uri or {"name", "path", "base_model_name"} (vLLM's --lora-modules).
    lora_modules: tuple[Registration, ...] = ()
    # Filesystem resolver: <lora_root>/<name> on the first request.
    lora_root: str = ""
    # Hub resolver: names that are one of these org/repo ids (vLLM's VLLM_LORA_RESOLVER_HF_REPO_LIST).
    hf_repo_allowlist: tuple[str, ...] = ()
    hf_revision: str = "main"
    # huggingface_hub's cache; default: the library's (HF_HUB_CACHE / HF_HOME).
    hf_cache_dir: str = ""
    # S3: endpoint for MinIO / moto (default AWS); the resolver maps a name to s3://<bucket>/<prefix><name>/.
    s3_endpoint_url: str = ""
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_max_attempts: int = 5
    s3_max_concurrency: int = 10
    s3_multipart_chunksize: int = 8 << 20
    # Where an unregistered name is looked for, in order; kinds without configuration are skipped.
    resolvers: tuple[str, ...] = RESOLVER_KINDS
    # Resolver plugins to load (entry-point names in loraserve.adapter_resolvers; "*" = all installed).
    plugins: tuple[str, ...] = ()
    # Per-plugin options, JSON: {"plugin-name": {...}}.
    plugin_options: dict = field(default_factory=dict)
    # Optional checks against the base model served: its name, and its config.json (projection shapes).
    base_model_name: str = ""
    base_model_config: str = ""
    # Register / Delete. Off unless enabled; when on, they need `authorization: Bearer <admin_token>`.
    enable_admin: bool = False
    admin_token: str = field(default="", repr=False)
    # Threads for downloads (resolve, register) and for file reads (Fetch), kept apart so a slow source
    # never starves the streams of cached adapters.
    download_threads: int = 8
    io_threads: int = 16
    drain_timeout_s: float = 10.0
    log_level: str = "info"

    def __post_init__(self):
        checks = [
            (0 <= self.port <= 65535, f"port must be in [0, 65535], not {self.port}"),
            (self.max_adapter_bytes >= 1, "max_adapter_bytes must be >= 1"),
            (self.cache_max_bytes >= self.max_adapter_bytes,
             f"cache_max_bytes ({self.cache_max_bytes}) must be >= max_adapter_bytes ({self.max_adapter_bytes})"),
            (self.max_lora_rank >= 1, f"max_lora_rank must be >= 1, not {self.max_lora_rank}"),
            (self.s3_max_attempts >= 1 and self.s3_max_concurrency >= 1, "s3 attempts and concurrency must be >= 1"),
            (self.download_threads >= 1 and self.io_threads >= 1, "download_threads and io_threads must be >= 1"),
            (self.drain_timeout_s >= 0, f"drain_timeout_s must be >= 0, not {self.drain_timeout_s}"),
            (not self.lora_root or Path(self.lora_root).is_dir(), f"lora_root {self.lora_root!r} is not a directory"),
            (not self.base_model_config or Path(self.base_model_config).is_file(),
             f"base_model_config {self.base_model_config!r} is not a file"),
            (not self.enable_admin or self.admin_token,
             f"admin RPCs are enabled but {ADMIN_TOKEN_ENV} is empty: set a token (or leave admin off)"),
            (len(set(self.resolvers)) == len(self.resolvers), f"resolvers has duplicates: {self.resolvers}"),
            (isinstance(self.plugin_options, dict), "plugin_options must be a JSON object"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for kind in self.resolvers:
            if kind not in RESOLVER_KINDS and not (kind.startswith("plugin:") and kind[len("plugin:"):]):
                raise ValueError(f"resolver {kind!r} is unknown: use {', '.join(RESOLVER_KINDS)} or plugin:NAME")
        for repo in self.hf_repo_allowlist:
            check_repo_id(repo)
        names = [m.name for m in self.lora_modules]
        if len(set(names)) != len(names):
            raise ValueError(f"lora_modules names must be unique: {names}")
        self.base_model()  # a config.json that is not one fails here, before anything starts

    def limits(self) -> Limits:
        return Limits(max_adapter_bytes=self.max_adapter_bytes, max_lora_rank=self.max_lora_rank)

    def base_model(self) -> BaseModel:
        shapes = None
        if self.base_model_config:
            try:
                shapes = BaseModelShapes.from_config(Path(self.base_model_config).read_text(), self.base_model_config)
            except (OSError, ValueError) as e:
                raise ValueError(f"base_model_config {self.base_model_config!r}: {e}") from None
        return BaseModel(name=self.base_model_name, shapes=shapes)

    def s3_settings(self) -> S3Settings:
        return S3Settings(endpoint_url=self.s3_endpoint_url, max_attempts=self.s3_max_attempts,
                          multipart_chunksize=self.s3_multipart_chunksize, max_concurrency=self.s3_max_concurrency)

    def hub_settings(self) -> HubSettings:
        return HubSettings(cache_dir=self.hf_cache_dir, revision=self.hf_revision)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> StoreConfig:
        """Parse flags, fill the rest from LORASERVE_STORE_* variables; exit 2 with a message if invalid."""
        environ = os.environ if environ is None else environ
        parser = _parser()
        ns = vars(parser.parse_args(argv))
        values = {}
        for f in fields(cls):
            raw, var = ns.get(f.name), None
            if raw is None:
                for var in _env_names(f.name):
                    if environ.get(var, "") != "":
                        raw = environ[var]
                        break
                else:
                    continue
            try:
                values[f.name] = _convert(f.name, raw)
            except ValueError as e:
                parser.error(f"{var}={raw!r}: {e}" if var else f"--{f.name.replace('_', '-')}: {e}")
        try:
            return cls(**values)
        except ValueError as e:
            parser.error(str(e))


# -- flags and variables ----------------------------------------------------------------------------

_INT = {"port", "max_lora_rank", "s3_max_attempts", "s3_max_concurrency", "download_threads", "io_threads"}
_SIZE = {"cache_max_bytes", "max_adapter_bytes", "s3_multipart_chunksize"}
_LIST = {"hf_repo_allowlist", "resolvers", "plugins"}
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}


def _env_names(name: str) -> list[str]:
    if name == "admin_token":
        return [ADMIN_TOKEN_ENV]
    if name == "enable_admin":
        return [ENV_PREFIX + "ENABLE_ADMIN", SHARED_ADMIN_ENV]
    return [ENV_PREFIX + name.upper()]


def parse_size(raw: str) -> int:
    """'20GiB', '512 MiB', '1e9', '65536' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(raw))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError("not a size (e.g. 65536, 512MiB, 20GiB)")
    try:
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    except ValueError:
        raise ValueError("not a size (e.g. 65536, 512MiB, 20GiB)") from None


def _convert(name: str, raw):
    if name == "lora_modules" and isinstance(raw, list):  # from the flag: one spec per word
        return tuple(Registration.parse(item) for item in raw)
    if not isinstance(raw, str):  # from a typed flag
        return raw
    if name in _INT:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("not an integer") from None
    if name in _SIZE:
        return parse_size(raw)
    if name == "drain_timeout_s":
        return float(raw)
    if name == "enable_admin":
        low = raw.strip().lower()
        if low not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError("not a boolean (true/false)")
        return low in ("1", "true", "yes", "on")
    if name in _LIST:
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    if name == "plugin_options":
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e})") from None
    if name == "lora_modules":  # a JSON list (of strings or objects), else shell-style words
        if raw.lstrip().startswith("["):
            items = json.loads(raw)
            if not isinstance(items, list):
                raise ValueError("expected a JSON list")
        else:
            items = shlex.split(raw)
        return tuple(Registration.parse(item) for item in items)
    return raw


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adapter_store",
        description="LoRA adapter store: resolves adapter names to validated, cached files and streams them to "
        f"workers (loraserve.v1.AdapterStoreService). Every flag --foo-bar may instead come from ${ENV_PREFIX}FOO_BAR.",
    )
    add = p.add_argument
    add("--host", help="address to listen on (default 0.0.0.0)")
    add("--port", help="port to listen on; 0 picks a free one (default 50052)")
    add("--cache-dir", help="the disk cache (default ~/.cache/loraserve/adapters)")
    add("--cache-max-bytes", help="cache cap, LRU by bytes (default 20GiB)")
    add("--max-adapter-bytes", help="largest adapter accepted (default 2GiB)")
    add("--max-lora-rank", help="largest LoRA rank accepted (default 64)")
    add("--lora-modules", nargs="+", metavar="SPEC",
        help='pre-registered names: name=uri or {"name": ..., "path": ..., "base_model_name": ...}; a uri is '
             "s3://bucket/prefix/, hf://org/repo[/sub][@rev], file:///dir, a directory, or plugin:NAME/KEY")
    add("--lora-root", help="filesystem resolver: look an unknown name up as <root>/<name>")
    add("--hf-repo-allowlist", help="Hub resolver: comma-separated org/repo ids a name may resolve to")
    add("--hf-revision", help="revision for names the Hub resolver finds (default main)")
    add("--hf-cache-dir", help="huggingface_hub's cache (default: the library's)")
    add("--s3-endpoint-url", help="S3 endpoint (MinIO, moto); default AWS")
    add("--s3-bucket", help="S3 resolver: the bucket where <prefix><name>/ is looked up")
    add("--s3-prefix", help="S3 resolver: key prefix (default none)")
    add("--s3-max-attempts", help="attempts per S3 request, standard retry mode (default 5)")
    add("--s3-max-concurrency", help="parallel ranged GETs per large file (default 10)")
    add("--s3-multipart-chunksize", help="bytes per ranged GET (default 8MiB)")
    add("--resolvers", help=f"order for unregistered names (default {','.join(RESOLVER_KINDS)}; also plugin:NAME)")
    add("--plugins", help='resolver plugins to load, comma-separated entry-point names ("*": all installed)')
    add("--plugin-options", help='JSON options per plugin: {"name": {...}}')
    add("--base-model-name", help="refuse adapters registered or trained for another base model")
    add("--base-model-config", help="the base model's config.json: check adapter shapes against it")
    add("--enable-admin", action=argparse.BooleanOptionalAction, default=None,
        help=f"allow Register / Delete (with ${ADMIN_TOKEN_ENV}); env {ENV_PREFIX}ENABLE_ADMIN or {SHARED_ADMIN_ENV}")
    add("--download-threads", help="concurrent downloads (default 8)")
    add("--io-threads", help="threads reading cached files for Fetch (default 16)")
    add("--drain-timeout-s", help="on SIGTERM, how long running RPCs may finish (default 10)")
    add("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    return p
