"""The embedded default: a small random Llama checkpoint with a real tokenizer, the demo PEFT adapters, and a
Hugging Face cache holding one of them, built once into the demo directory (nothing is downloaded)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when what is built changes: an older demo directory is rebuilt.
VERSION = 1
HUB_REPO = "demo-org/chat-lora"  # resolved through the Hub resolver (offline, from the local cache)
PRELOADED = "sql-lora"  # given to the worker as name=path
PRELOADED_JSON = "math-lora"  # given to the worker as {"name", "path", "base_model_name"}


@dataclass(frozen=True)
class DemoAssets:
    model_dir: Path
    adapters_dir: Path  # <dir>/<name>/: the store's filesystem resolver root
    hub_cache: Path


def ensure_demo(root: Path) -> DemoAssets:
    """Build the demo into `root` unless a complete build of this VERSION is there; return its paths."""
    assets = DemoAssets(root / "model", root / "adapters", root / "hub")
    stamp = root / "demo.json"
    try:
        if json.loads(stamp.read_text()).get("version") == VERSION:
            return assets
    except (OSError, ValueError):
        pass
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # peft looks the base model up on the Hub otherwise
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from demo import build_default_adapters, build_llama, fill_hub_cache  # transformers + peft: only here

    log.info("building the demo model and adapters into %s (once)", root)
    building = root.with_name(root.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    # A bigger model than the tests' (still random, still CPU-fast): 4 layers, hidden 128.
    model = build_llama(building / "model", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                        intermediate_size=256, max_position_embeddings=2048)
    adapters = build_default_adapters(model, building / "adapters")
    fill_hub_cache(building / "hub", HUB_REPO, adapters["chat-lora"])
    shutil.rmtree(root, ignore_errors=True)
    building.rename(root)
    stamp.write_text(json.dumps({"version": VERSION, "adapters": sorted(adapters)}))
    return assets


if __name__ == "__main__":  # python -m stack.assets DIR: build the demo there (an init container's job)
    import sys

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stack.assets DIR")
    print(ensure_demo(Path(sys.argv[1])).model_dir)
