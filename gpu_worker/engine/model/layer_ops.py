"""The decoder layer's elementwise steps, in two interchangeable sets: plain torch (the CPU path and the
reference) and the fused Triton kernels of kernels/elementwise.py (one launch each where torch runs 2-12,
for the GPU). LlamaModel calls whichever it was built with; the projections and attention do not change.

    x, h = ops.add_norm(h, residual, weight, eps)     # h + residual (None: h), and RMSNorm of it
    q = ops.rope_and_cache(q, k, v, positions, rope, k_cache, v_cache, meta)   # rotated q; rotated k and v
                                                      # written to the cache at meta.slot_mapping
    act = ops.silu_mul(gate_up)                       # silu(gate) * up

Each takes an optional `delta`: the adapters' part of the projection it reads (residual, q / k / v, gate_up),
when the LoRA backend computed it beside the projection instead of adding it in place (LoRADelta), or left it
to expand (kernels/consumer_expand.PendingExpand, from the decode graphs' stacked GEMMs); it is added, rows with
an adapter only, before anything else.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .attention import write_kv
from .rope import RotaryEmbedding


class LoRADelta(NamedTuple):
    """The adapters' part of a projection's output: values laid out as the output (for q / k / v, a tuple of
    three), and each token's slot [T] int32; rows whose slot is -1 hold nothing and are never read."""

    values: torch.Tensor | tuple[torch.Tensor, ...]
    slots: torch.Tensor


def plus_delta(x: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x plus the adapters' part, in x's dtype, on the rows with an adapter."""
    has = (slots >= 0).view(-1, *[1] * (x.dim() - 1))
    return torch.where(has, x + values, x)


def as_delta(delta) -> LoRADelta | None:
    """A PendingExpand expanded into values (the kernels' reference, kernels/consumer_expand.expand_values), for the
    torch ops; a LoRADelta or None as it is."""
    if delta is None or isinstance(delta, LoRADelta):
        return delta
    from kernels.consumer_expand import expand_values

    return LoRADelta(expand_values(delta, delta.b[0].dtype), delta.slots)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In float32, as Hugging Face does, then back: bf16 variance loses ~3 digits.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class TorchOps:
    @staticmethod
    def add_norm(h, residual, weight, eps, delta=None, prefetch=None):
        delta = as_delta(delta)
        if delta is not None:
            residual = plus_delta(residual, *delta)
        if residual is not None:
            h = h + residual
        return rms_norm(h, weight, eps), h

    @staticmethod
    def rope_and_cache(q, k, v, positions, rope: RotaryEmbedding, k_cache, v_cache, meta,
                       delta=None):
        if delta is not None and not isinstance(delta, LoRADelta):  # pending: values [T, q + 2 kv], split as q, k, v
            values, slots = as_delta(delta)
            delta = LoRADelta(tuple(d.view_as(t) for t, d in zip((q, k, v), values.split(
                [q[0].numel(), k[0].numel(), v[0].numel()], dim=-1))), slots)
        if delta is not None:
            q, k, v = (plus_delta(t, d, delta.slots) for t, d in zip((q, k, v), delta.values))
        q, k = rope.apply(q, k, positions)
        write_kv(k_cache, v_cache, k, v, meta)
        return q

    @staticmethod
    def silu_mul(gate_up, delta=None):
        delta = as_delta(delta)
        if delta is not None:
            gate_up = plus_delta(gate_up, *delta)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class FusedOps:
    @staticmethod
    def add_norm(h, residual, weight, eps, delta=None, prefetch=None):
        from kernels.elementwise import add_rms_norm

        return add_rms_norm(h, residual, weight, eps, delta, prefetch)

    @staticmethod
    def rope_and_cache(q, k, v, positions, rope: RotaryEmbedding, k_cache, v_cache, meta,
                       delta=None):
        from kernels.elementwise import rope_and_cache

        rope_and_cache(q, k, v, positions, rope.cos, rope.sin, k_cache, v_cache, meta.slot_mapping, delta)
        return q

    @staticmethod
    def silu_mul(gate_up, delta=None):
        from kernels.elementwise import silu_mul

        return silu_mul(gate_up, delta)
