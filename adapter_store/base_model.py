"""The base model the store validates against (both optional): its name, as the worker serves it, and the
shapes of its projections, read from its config.json (LORASERVE_STORE_BASE_MODEL_CONFIG)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

from adapter_store.errors import AdapterRejectedError


@dataclass(frozen=True)
class BaseModelShapes:
    num_layers: int
    # module -> (in_features, out_features)
    dims: dict[str, tuple[int, int]]

    @classmethod
    def from_config(cls, text: str, where: str) -> BaseModelShapes:
        """From a Hugging Face config.json's text; ValueError naming what is missing."""
        cfg = json.loads(text)
        try:
            h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
            heads = cfg["num_attention_heads"]
            kv_heads = cfg.get("num_key_value_heads") or heads
            head_dim = cfg.get("head_dim") or h // heads
        except KeyError as e:
            raise ValueError(f"{where} has no {e.args[0]}: is it a Llama-family config.json?") from None
        q, kv = heads * head_dim, kv_heads * head_dim
        dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        return cls(int(layers), dims)


def check_base_model(served: str, registered: str, declared: str, what: str) -> None:
    """Refuse an adapter made for another base model than `served` (when the store is told it).
    The registered base model must equal it; the config's base_model_name_or_path (often a local path or a
    Hub id) must equal it or end in the same last path component ("/models/Llama-3-8B" ~ "meta/Llama-3-8B")."""
    if not served:
        return
    if registered and registered != served:
        raise AdapterRejectedError(f"{what} is registered for base model {registered!r}; the store serves "
                                   f"{served!r}")
    if not registered and declared and declared != served and _last(declared) != _last(served):
        raise AdapterRejectedError(f"{what} was trained on {declared!r} (base_model_name_or_path); the store "
                                   f"serves {served!r}")


def _last(path: str) -> str:
    return PurePosixPath(path.rstrip("/")).name
