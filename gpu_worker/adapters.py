"""Where the worker finds an adapter by name: pre-loaded modules (vLLM's --lora-modules), else `<lora_root>/<name>`
(vLLM's filesystem resolver). The adapter store client (issue #5) will be a second source with the same `lookup`.

A name is a name, never a path: it is checked against a strict pattern before it goes near the filesystem.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from gpu_worker.engine.errors import AdapterError, InvalidRequestError
from gpu_worker.engine.lora_request import LoRARequest

# One optional "org/" prefix, then the name; each part starts alphanumeric, so "." and ".." cannot be a part.
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(rf"^(?:{_PART}/)?{_PART}$")


def check_adapter_name(name: str) -> str:
    """`name` if it is a valid adapter name; InvalidRequestError saying what is allowed otherwise."""
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("adapter.name must not be empty")
    if ".." in name or not _NAME.match(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise InvalidRequestError(
            f"adapter.name {shown!r} is not a valid adapter name: use letters, digits, '.', '_' and '-' "
            "(at most 128, starting with a letter or digit, no '..'), with at most one 'org/' prefix"
        )
    return name


@dataclass(frozen=True)
class LoRAModule:
    """One pre-loaded adapter: `name=path`, or JSON {"name", "path", "base_model_name"} as in vLLM."""

    name: str
    path: str
    base_model_name: str | None = None

    @classmethod
    def parse(cls, spec: str | dict) -> LoRAModule:
        """Parse one --lora-modules entry; ValueError with the entry and the expected forms."""
        if isinstance(spec, str) and spec.lstrip().startswith("{"):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"lora module {spec!r} is not valid JSON ({e})") from None
        if isinstance(spec, dict):
            unknown = set(spec) - {"name", "path", "base_model_name"}
            if unknown or not spec.get("name") or not spec.get("path"):
                raise ValueError(f"lora module {spec!r}: expected {{\"name\": ..., \"path\": ..., "
                                 f"\"base_model_name\": ... (optional)}}")
            name, path, base = str(spec["name"]), str(spec["path"]), spec.get("base_model_name")
        elif isinstance(spec, str) and "=" in spec:
            name, path = spec.split("=", 1)
            base = None
        else:
            raise ValueError(f"lora module {spec!r}: expected name=path or a JSON object")
        try:
            check_adapter_name(name)
        except InvalidRequestError as e:
            raise ValueError(f"lora module {name!r}: {e}") from None
        if not path:
            raise ValueError(f"lora module {name!r}: the path is empty")
        return cls(name, path, str(base) if base else None)


class LocalAdapterSource:
    """Adapters from the local filesystem. Used from the event loop thread only (not thread-safe)."""

    def __init__(self, modules: list[LoRAModule] | tuple[LoRAModule, ...] = (), lora_root: str | Path | None = None):
        self.modules = {m.name: m for m in modules}
        self.lora_root = Path(lora_root) if lora_root else None
        # LoRARequest wants a positive int id per adapter (vLLM compatibility); the engine keys on the hash.
        self._ids: dict[str, int] = {}

    def lookup(self, name: str) -> LoRARequest:
        """The LoRARequest for `name`. InvalidRequestError for a bad name, AdapterError(not_found) if unknown."""
        check_adapter_name(name)
        module = self.modules.get(name)
        if module is not None:
            return LoRARequest(name, self._id(name), module.path, module.base_model_name)
        if self.lora_root is not None:
            path = self.lora_root / name
            if path.is_dir():
                return LoRARequest(name, self._id(name), str(path))
        where = ", ".join(sorted(self.modules)) or "none"
        root = f" and no directory {name!r} under {self.lora_root}" if self.lora_root else " (and no --lora-root)"
        raise AdapterError("not_found", f"adapter {name!r} is unknown to this worker: pre-loaded adapters are "
                           f"[{where}]{root}")

    def _id(self, name: str) -> int:
        return self._ids.setdefault(name, len(self._ids) + 1)
