"""Applying the adapters of a batch in plain torch: the CPU path, and the reference the kernels match.

The runner lays tokens out grouped by slot, so each adapter's tokens form one contiguous segment and its
weights are read once per projection (SGMV style), with no per-token gather of weight matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .slot_buffers import SlotBuffers


@dataclass
class LoRABatch:
    """A step's LoRA metadata, computed once and used by every layer."""

    # (slot, start, end) for each run of tokens that use adapter `slot`; tokens without one are left out.
    segments: list[tuple[int, int, int]]
    # [T] int32 slot of every token (-1: none), for kernels that take per-token indices.
    token_slots: torch.Tensor

    @classmethod
    def from_runs(cls, runs: list[tuple[int, int]], device: torch.device) -> LoRABatch:
        """runs: (slot, num_tokens) in token order."""
        segments, at, slots = [], 0, []
        for slot, n in runs:
            if slot >= 0 and n:
                if segments and segments[-1][0] == slot and segments[-1][2] == at:
                    segments[-1] = (slot, segments[-1][1], at + n)
                else:
                    segments.append((slot, at, at + n))
            slots.extend([slot] * n)
            at += n
        return cls(segments, torch.tensor(slots, dtype=torch.int32, device=device))


class TorchLoRA:
    """LoRAHook over SlotBuffers for one step. groups: the fused groups the step's adapters target (None: all);
    projections of other groups run no LoRA op (their slots hold zeros for these adapters)."""

    def __init__(self, buffers: SlotBuffers, batch: LoRABatch, groups: frozenset[str] | None = None):
        self.buffers = buffers
        self.batch = batch
        self.groups = groups

    def layer_prefetch(self, layer: int, norm: str) -> None:
        """Nothing to ask into a cache on this path."""

    def project(self, layer: int, group: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """F.linear(x, weight, bias) with the adapters' part added in place: (out, None)."""
        out = F.linear(x, weight, bias)
        self.apply(layer, group, x, out)
        return out, None

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.groups is not None and group not in self.groups:
            return
        a = self.buffers.a[layer][group]  # [slots, S, R, in]
        bs = self.buffers.b[layer][group]
        offsets = self.buffers.shapes[group].slice_offsets
        for slot, start, end in self.batch.segments:
            y = torch.einsum("ti,sri->tsr", x[start:end], a[slot])  # shrink: [n, S, R]
            for s, b in enumerate(bs):  # expand each slice into its columns
                cols = slice(offsets[s], offsets[s] + b.shape[1])
                out[start:end, cols] += y[:, s] @ b[slot].T
