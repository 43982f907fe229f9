"""LoRA backends: alternative implementations of one small interface (bind a step's token layout, get a
hook the model calls per projection). "torch" is the CPU path and the reference; "triton" runs the
segmented shrink/expand kernels of `kernels/` on CUDA. "auto" picks triton on CUDA when it imports."""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from .slot_buffers import SlotBuffers
from .torch_backend import LoRABatch, TorchLoRA

log = logging.getLogger(__name__)


class LoRABackend(Protocol):
    def bind(self, runs: list[tuple[int, int]]):
        """runs: (slot, num_tokens) in token order -> a LoRAHook for this step."""


class TorchBackend:
    name = "torch"

    def __init__(self, buffers: SlotBuffers, device: torch.device):
        self.buffers, self.device = buffers, device

    def bind(self, runs):
        return TorchLoRA(self.buffers, LoRABatch.from_runs(runs, self.device))


class TritonBackend:
    name = "triton"

    def __init__(self, buffers: SlotBuffers, device: torch.device, max_tokens: int):
        from kernels import LoRAKernelMeta, TritonLoRA

        self.buffers, self.device = buffers, device
        self._hook_cls = TritonLoRA
        self.meta = LoRAKernelMeta(max_tokens=max_tokens, max_slots=buffers.num_slots, device=device)

    def bind(self, runs):
        slots = torch.tensor([s for s, n in runs for _ in range(n)], dtype=torch.int32)
        slots = slots.to(self.device, non_blocking=True)
        self.meta.prepare(slots)
        return self._hook_cls(self.buffers, self.meta)


def make_backend(name: str, buffers: SlotBuffers, device: torch.device, max_tokens: int) -> LoRABackend:
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchBackend(buffers, device)
    try:
        return TritonBackend(buffers, device, max_tokens)
    except ImportError as e:
        if name == "triton":
            raise
        log.warning("Triton LoRA kernels unavailable (%s); using the torch backend", e)
        return TorchBackend(buffers, device)
