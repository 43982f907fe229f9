"""Which projections LoRA can target, and how they group into the model's fused matrices."""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelConfig

# PEFT module name -> (fused group, slice index within the group).
MODULE_GROUP = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}


@dataclass(frozen=True)
class GroupShape:
    in_features: int
    # Output width of each slice, in order; the slices sit side by side in the fused output.
    slice_widths: tuple[int, ...]

    @property
    def slice_offsets(self) -> tuple[int, ...]:
        offsets, at = [], 0
        for w in self.slice_widths:
            offsets.append(at)
            at += w
        return tuple(offsets)


def group_shapes(cfg: ModelConfig) -> dict[str, GroupShape]:
    return {
        "qkv": GroupShape(cfg.hidden_size, (cfg.q_size, cfg.kv_size, cfg.kv_size)),
        "o": GroupShape(cfg.q_size, (cfg.hidden_size,)),
        "gate_up": GroupShape(cfg.hidden_size, (cfg.intermediate_size, cfg.intermediate_size)),
        "down": GroupShape(cfg.intermediate_size, (cfg.hidden_size,)),
    }


def module_shape(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a target module."""
    group, index = MODULE_GROUP[module]
    shape = group_shapes(cfg)[group]
    return shape.in_features, shape.slice_widths[index]
