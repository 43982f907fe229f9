"""Builders of tiny, deterministic, offline test/demo assets.

Everything here runs on CPU in about a second and never touches the network, so tests and ``make run``
can create a real (if random) checkpoint, LoRA adapters and a Hugging Face cache layout on the fly
instead of downloading them.  Names are re-exported lazily so that ``import demo.tokenizer`` does not
pay for importing torch/peft.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DEFAULT_ADAPTERS": "demo.adapters",
    "AdapterSpec": "demo.adapters",
    "build_default_adapters": "demo.adapters",
    "build_lora_adapter": "demo.adapters",
    "fill_hub_cache": "demo.hub_cache",
    "build_llama": "demo.model",
    "build_mistral": "demo.model",
    "build_qwen2": "demo.model",
    "build_tokenizer": "demo.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'demo' has no attribute {name!r}")
