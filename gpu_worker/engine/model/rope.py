"""Rotary position embeddings, with the scaling schemes Llama 3, Mistral and Qwen2 checkpoints use."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, UnsupportedModelError


def inv_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] in float32, attention scaling applied to cos/sin)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type", "default"))
    if kind == "default":
        return inv, 1.0
    factor = float(cfg.rope_scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        low = float(cfg.rope_scaling["low_freq_factor"])
        high = float(cfg.rope_scaling["high_freq_factor"])
        old_len = float(cfg.rope_scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(cfg, inv, factor)
    raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (default, linear, llama3, yarn)")


def _yarn(cfg: ModelConfig, inv: torch.Tensor, factor: float) -> tuple[torch.Tensor, float]:
    dim, base = cfg.head_dim, cfg.rope_theta
    old_len = cfg.rope_scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings
    beta_fast = cfg.rope_scaling.get("beta_fast") or 32
    beta_slow = cfg.rope_scaling.get("beta_slow") or 1
    mscale = cfg.rope_scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(rotations):
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
    return inv, float(mscale)


class RotaryEmbedding:
    """Precomputed cos/sin tables indexed by position; applied in the Hugging Face (rotate-half) layout."""

    def __init__(self, cfg: ModelConfig, max_positions: int, device: torch.device, dtype: torch.dtype):
        inv, scale = inv_frequencies(cfg)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * scale).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * scale).to(device=device, dtype=dtype)

    def apply(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, KVH, D], positions [T] -> rotated q, k."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
