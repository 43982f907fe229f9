"""What the examples share: where the base model and the adapters are (the demo's, built once, unless given)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python examples/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def model_and_adapters(description: str, argv: list[str] | None = None) -> tuple[argparse.Namespace, Path, Path]:
    """Parse --model / --adapters (default: the demo's in .demo/, built on first use)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="a Hugging Face model directory (default: the demo model)")
    p.add_argument("--adapters", help="a directory of PEFT adapters <dir>/<name>/ (default: the demo's)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.model and args.adapters:
        return args, Path(args.model), Path(args.adapters)
    from stack.assets import ensure_demo

    demo = ensure_demo(ROOT / ".demo")
    return args, Path(args.model or demo.model_dir), Path(args.adapters or demo.adapters_dir)
