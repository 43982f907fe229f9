"""Adapter names. A name is a name, never a path: it is checked against one strict pattern (the worker's,
so the two services agree on what a name is) before it goes near a filesystem, a bucket or the Hub."""

from __future__ import annotations

import re

from adapter_store.errors import InvalidArgumentError

# One optional "org/" prefix, then the name; each part starts alphanumeric, so "." and ".." cannot be a part.
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
NAME_PATTERN = re.compile(rf"^(?:{_PART}/)?{_PART}$")


def check_name(name: str) -> str:
    """`name` if it is a valid adapter name, else InvalidArgumentError saying what is allowed."""
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError("adapter name must not be empty")
    if ".." in name or not NAME_PATTERN.match(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise InvalidArgumentError(
            f"{shown!r} is not a valid adapter name: use letters, digits, '.', '_' and '-' (at most 128, "
            "starting with a letter or digit, no '..'), with at most one 'org/' prefix; a name is never a path"
        )
    return name
