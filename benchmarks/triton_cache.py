"""The Triton cache's compiled kernels, to tell what compiled after an engine's warm-up (a compile inside a step
stalls it 1-4 s on a fresh machine)."""

from __future__ import annotations

import os
from pathlib import Path


def compiled_kernels() -> set[Path]:
    """The Triton cache's compiled kernels (their metadata files): a set taken before and after shows what compiled
    in between (on a machine whose cache did not hold them already)."""
    try:
        import triton

        root = Path(triton.knobs.cache.dir)
    except (ImportError, AttributeError):
        root = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return {p for p in root.glob("*/*.json") if not p.name.startswith("__grp__")}
