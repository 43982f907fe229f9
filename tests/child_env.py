"""The environment of a process a test starts: this one's, with the repository first on PYTHONPATH and what
PYTHONPATH held kept after it (on a GPU machine the worker's wheels sit in a directory of their own there)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """os.environ with the repository first on PYTHONPATH, plus `extra`."""
    held = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *([held] if held else [])]), **extra}
