"""A module constant set for the duration of a block, as the benchmarks' A/B flags do (`--set`, `--compare-set`):
the code under test reads its constants when it plans a launch or captures a graph, so what is built inside the
block keeps the value.

    with module_set("kernels.consumer_expand.RANK_BLOCK=16"):   # MODULE.NAME=VALUE, VALUE a Python literal
        ...
    with module_set("kernels.elementwise.EXPAND_DECODE_BK=64;kernels.elementwise.EXPAND_GROUPED_MIN_ROWS=32"):
        ...                                                     # several, joined by ";"
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


@contextmanager
def constant(module: ModuleType, name: str, value) -> Iterator[None]:
    """module.<name> = value inside the block, the old value back after it."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


@contextmanager
def module_set(spec: str | None) -> Iterator[None]:
    """`constant` from a "MODULE.NAME=VALUE" spec, or several joined by ";" (None: nothing set)."""
    if spec is None:
        yield
        return
    first, _, rest = spec.partition(";")
    if rest:
        with module_set(first), module_set(rest):
            yield
        return
    target, value = spec.split("=", 1)
    module, name = target.rsplit(".", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"{spec}: the value must be a Python literal (a number, a string in quotes, True, ...)") from e
    with constant(importlib.import_module(module), name, parsed):
        yield
