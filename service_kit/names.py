"""Adapter names: a name is a name, never a path. One strict rule, shared, so every service agrees on it."""

from __future__ import annotations

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
