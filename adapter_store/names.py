"""Adapter names. A name is a name, never a path: it is checked against one strict pattern (the worker's,
so the two services agree on what a name is) before it goes near a filesystem, a bucket or the Hub."""

from __future__ import annotations

from adapter_store.errors import InvalidArgumentError
from service_kit.names import NAME_PATTERN, name_problem

__all__ = ["NAME_PATTERN", "check_name"]

def check_name(name: str) -> str:
    """`name` if it is a valid adapter name, else InvalidArgumentError saying what is allowed."""
    problem = name_problem(name)
    if problem:
        raise InvalidArgumentError(problem)
    return name
