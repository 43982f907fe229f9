"""LoRA backends: alternative implementations of one small interface (bind a step's token layout, get a
hook the model calls per projection). "torch" is the CPU path and the reference; "triton" runs the
segmented shrink/expand kernels of `kernels/` on CUDA. "auto" picks triton on CUDA when it imports."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Protocol

import numpy as np
import torch

from .slot_buffers import SlotBuffers
from .torch_backend import LoRABatch, TorchLoRA

log = logging.getLogger(__name__)


def token_slots_of(runs: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(slot, num_tokens) runs in token order -> each token's slot, int32 on `device` (one numpy repeat: a step of
    64 prompts of 128 tokens took 0.9 ms to list its 8,192 slots in Python)."""
    ids, counts = zip(*runs) if runs else ((), ())
    slots = torch.from_numpy(np.repeat(np.asarray(ids, np.int32), np.asarray(counts, np.int64)))
    return slots.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else slots


class LoRABackend(Protocol):
    buffers: SlotBuffers  # groups_used(slots): the fused groups a step's adapters target

    def bind(self, runs: list[tuple[int, int]], groups: frozenset[str]):
        """runs: (slot, num_tokens) in token order; groups: the fused groups their adapters target
        (`SlotBuffers.groups_used`) -> a LoRAHook for this step, which runs LoRA on those groups only."""


class TorchBackend:
    name = "torch"
    graphable = False  # loops over segments on the host

    def __init__(self, buffers: SlotBuffers, device: torch.device):
        self.buffers, self.device = buffers, device

    def bind(self, runs, groups):
        return TorchLoRA(self.buffers, LoRABatch.from_runs(runs, self.device), groups)


class TritonBackend:
    name = "triton"
    graphable = True  # metadata and kernels read fixed-size device buffers only

    def __init__(self, buffers: SlotBuffers, device: torch.device, max_tokens: int, consumer_expands: bool = False):
        from kernels import LoRAKernelMeta
        from kernels.engine_backend import TritonLoRA
        from kernels.lora_expand_rows import SPREAD_ROWS, SPREAD_TOKENS

        self.buffers, self.device = buffers, device
        if device.type == "cuda" and device.index is None:  # tensors report cuda:N; compare like with like
            device = torch.device("cuda", torch.cuda.current_device())
        self.meta = LoRAKernelMeta(max_tokens, buffers.num_slots, device)
        self.hook = TritonLoRA(buffers, self.meta, consumer_expands)
        # Batches of up to `spread_tokens` tokens, none of whose adapters holds more than `spread_rows` of them, run
        # a faster expand when their step says so (`LoRAKernelMeta.spread`): decode graphs are captured for them too.
        self.spread_rows, self.spread_tokens = SPREAD_ROWS, SPREAD_TOKENS

    def bind(self, runs, groups):
        tokens = Counter()
        for s, n in runs:
            if s >= 0 and n > 0:
                tokens[s] += n
        self.hook.prepare(token_slots_of(runs, self.device), len(tokens), groups=groups,
                          spread=max(tokens.values(), default=None))
        return self.hook

    @torch.inference_mode()
    def warmup(self) -> None:
        """Compile every kernel variant a step can need before serving, at every rank stride the slots may be
        laid out at: launch configs change with the token count and the number of adapters in the step, each
        rounded to a power of two (row tiles, splits of K); a first compile inside a step stalled it by ~1.5 s on
        an H100."""
        n = 0
        for rank_class in self.buffers.classes:
            with self.buffers.layout(rank_class):
                n += self._warm_kernels() + self._warm_consumer_expand()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("LoRA kernels compiled for %d shapes", n)

    def _warm_kernels(self) -> int:
        """The segmented shrink and expand for every token count and adapter count a step rounds to, and for
        steps whose adapters hold at most one or two tokens each (bind's `spread`: the launches pick other
        configs for those)."""
        t, n = 1, 0
        while t <= self.meta.max_tokens:
            most = min(t, self.meta.max_slots)
            for distinct in sorted({most, *(1 << k for k in range(most.bit_length()) if 1 << k <= most)}):
                for spread in (None, 2, 1):
                    if spread is not None and distinct * spread < t:
                        continue  # no step of t tokens over `distinct` adapters holds so few an adapter
                    self.hook.prepare(torch.zeros(t, dtype=torch.int32, device=self.device), distinct,
                                      spread=spread)
                    for group, a in self.buffers.a[0].items():
                        x = torch.zeros(t, a.shape[-1], dtype=a.dtype, device=self.device)
                        out = torch.zeros(t, sum(b.shape[1] for b in self.buffers.b[0][group]), dtype=a.dtype,
                                          device=self.device)
                        self.hook.apply(0, group, x, out)
                        n += 1
            t = t * 2 if t * 2 <= self.meta.max_tokens or t == self.meta.max_tokens else self.meta.max_tokens
        return n

    def _warm_consumer_expand(self) -> int:
        """Eager steps hand gate_up's adapters' part to silu_mul (consumer_expands), whose expand compiles per
        row tile (up to EXPAND_MAX_ROWS rows one tile, past it tiles of EXPAND_TILE_ROWS, walked in a loop
        pipelined two or three stages deep by the step's size, `silu_prompt_grid`): each variant once."""
        from kernels.elementwise import EXPAND_MAX_ROWS, silu_mul, silu_prompt_grid

        a = self.buffers.a[0].get("gate_up")
        if not self.hook.consumer_expands or a is None:
            return 0
        sizes = [t for t in (16, 32, 64, EXPAND_MAX_ROWS, EXPAND_MAX_ROWS + 1) if t <= self.meta.max_tokens]
        n = self.buffers.b[0]["gate_up"][0].shape[1]
        most = self.meta.max_tokens
        if most > EXPAND_MAX_ROWS + 1 and silu_prompt_grid(most, n, self.device)[2] != \
                silu_prompt_grid(EXPAND_MAX_ROWS + 1, n, self.device)[2]:
            sizes.append(most)  # the largest step walks the most tiles a program: the deeper pipeline
        weight = torch.zeros(sum(b.shape[1] for b in self.buffers.b[0]["gate_up"]), a.shape[-1], dtype=a.dtype,
                             device=self.device)
        for t in sizes:
            self.hook.prepare(torch.zeros(t, dtype=torch.int32, device=self.device), 1)
            x = torch.zeros(t, a.shape[-1], dtype=a.dtype, device=self.device)
            silu_mul(*self.hook.project(0, "gate_up", x, weight, None))
        return len(sizes)


def make_backend(name: str, buffers: SlotBuffers, device: torch.device, max_tokens: int,
                 consumer_expands: bool = False) -> LoRABackend:
    """consumer_expands: the model's elementwise ops are the fused kernels (kernels/engine_backend.TritonLoRA)."""
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchBackend(buffers, device)
    try:
        return TritonBackend(buffers, device, max_tokens, consumer_expands)
    except ImportError as e:
        if name == "triton":
            raise
        log.warning("Triton LoRA kernels unavailable (%s); using the torch backend", e)
        return TorchBackend(buffers, device)
