"""Adapter names: a name is a name, never a path. One strict rule, shared, so every service agrees on it."""

from __future__ import annotations

import json
import re

# One optional "org/" prefix, then the name; each part starts alphanumeric, so "." and ".." cannot be a part.
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
NAME_PATTERN = re.compile(rf"^(?:{_PART}/)?{_PART}$")


def name_problem(name: object) -> str | None:
    """None when `name` is a valid adapter name, else what is wrong with it, in words a person can act on."""
    if not isinstance(name, str) or not name:
        return "an adapter name must not be empty"
    if ".." in name or not NAME_PATTERN.match(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        return (f"{shown!r} is not a valid adapter name: use letters, digits, '.', '_' and '-' (at most 128, "
                "starting with a letter or digit, no '..'), with at most one 'org/' prefix; a name is never a path")
    return None


def parse_lora_module(spec: str | dict, value: str = "path") -> tuple[str, str, str]:
    """One vLLM-style `--lora-modules` entry, `name=path` or {"name", "path", "base_model_name"} (a dict or
    JSON text) -> (name, path, base_model_name or ""). ValueError naming the entry and the expected forms;
    `value` names the right-hand side in messages ("path", or "uri" where sources are URIs)."""
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"lora module {spec!r} is not valid JSON ({e})") from None
    if isinstance(spec, dict):
        unknown = set(spec) - {"name", "path", "base_model_name"}
        if unknown or not spec.get("name") or not spec.get("path"):
            raise ValueError(f'lora module {spec!r}: expected {{"name": ..., "path": ..., '
                             '"base_model_name": ... (optional)}')
        name, path, base = str(spec["name"]), str(spec["path"]), str(spec.get("base_model_name") or "")
    elif isinstance(spec, str) and "=" in spec:
        name, path = spec.split("=", 1)
        base = ""
    else:
        raise ValueError(f"lora module {spec!r}: expected name={value} or a JSON object")
    problem = name_problem(name)
    if problem:
        raise ValueError(f"lora module {name!r}: {problem}")
    if not path:
        raise ValueError(f"lora module {name!r}: the path is empty")
    return name, path, base


def escape_from_root(root, path, files=()) -> str | None:
    """None when `path` (a directory under `root`, looked up by an adapter's name) and the given files in it
    resolve, symlinks followed, to places inside `root`; else which one leaves it. A resolver root is a place
    where adapters are dropped: a symlink in it must not make a name serve bytes from elsewhere (/etc, another
    tenant's directory)."""
    from pathlib import Path

    real_root = Path(root).resolve()
    for p in [Path(path), *(Path(path) / f for f in files)]:
        if p.exists() and not p.resolve().is_relative_to(real_root):
            return f"{p} resolves to {p.resolve()}, outside the adapters root {real_root}"
    return None
