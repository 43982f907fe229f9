"""Decode steps replayed from CUDA graphs.

A decode step is ~700 small kernels for a 16-layer model; launched one by one from Python that is 10-15 ms
of host time for a few ms of GPU work. Captured once per batch-size bucket, a step is one graph launch.
Inputs live in static buffers that each step refills; batches are padded up to the next bucket, and the
padding rows write their K/V into a scratch block that no sequence owns. Batches with an adapter and
batches without one have separate graphs, so base-only traffic never runs a LoRA op.
"""

from __future__ import annotations

import logging
import time

import torch

from .model.attention import DecodeMetadata
from .model.llama import LlamaModel

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 256)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_caches, block_size: int, max_batch: int, max_model_len: int,
                 scratch_block: int, lora=None):
        dev = model.device
        self.model, self.kv_caches, self.lora = model, kv_caches, lora
        self.block_size = block_size
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_blocks = -(-max_model_len // block_size)
        self.scratch_slot = scratch_block * block_size
        n = self.buckets[-1]
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.block_tables = torch.full((n, self.max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.token_slots = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(n, device=dev)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _forward(self, b: int, with_lora: bool) -> torch.Tensor:
        meta = DecodeMetadata(self.slot_mapping[:b], self.block_tables[:b], self.context_lens[:b])
        hook = None
        if with_lora:
            self.lora.hook.prepare(self.token_slots[:b])
            hook = self.lora.hook
        return self.model.forward(self.ids[:b], self.positions[:b], meta, self.kv_caches, self.rows[:b], hook)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        variants = [False, True] if self.lora is not None and self.lora.graphable else [False]
        # Largest first: smaller graphs then fit in the memory pool the largest one reserved.
        for b in reversed(self.buckets):
            for with_lora in variants:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # compiles the Triton kernels, warms cuBLAS
                        self._forward(b, with_lora)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    logits = self._forward(b, with_lora)
                self._pool = graph.pool()
                self.graphs[(b, with_lora)] = (graph, logits)
        torch.cuda.synchronize()
        log.info("captured %d decode graphs in %.1fs", len(self.graphs), time.perf_counter() - t0)

    def has(self, n: int, with_lora: bool) -> bool:
        b = self.bucket(n)
        return b is not None and (b, with_lora) in self.graphs

    def run(self, ids: list[int], positions: list[int], block_tables: list[list[int]],
            token_slots: list[int] | None, patch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One decode step for len(ids) sequences -> logits [n, vocab] (a view into the graph's output).
        patch: (rows, ids) on the device, tokens the host does not know yet (sampled by the step in flight)."""
        n = len(ids)
        b = self.bucket(n)
        bs = self.block_size
        width = max(len(t) for t in block_tables)
        table = torch.tensor([t + [t[-1]] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        pos = torch.tensor(positions, dtype=torch.int64)
        host = torch.stack([torch.tensor(ids, dtype=torch.int64), pos,
                            table[torch.arange(n), pos // bs].long() * bs + pos % bs, pos + 1])
        host = host.pin_memory() if n > 8 and self.ids.is_cuda else host
        dev = host.to(self.ids.device, non_blocking=True)
        self.ids[:n] = dev[0]
        if patch is not None:
            self.ids[patch[0]] = patch[1]
        self.positions[:n] = dev[1]
        self.slot_mapping[:n] = dev[2]
        self.context_lens[:n] = dev[3].to(torch.int32)
        self.block_tables[:n, :width] = table.to(self.ids.device, non_blocking=True)
        if b > n:  # padding rows: scratch block, one key
            self.slot_mapping[n:b] = self.scratch_slot
            self.context_lens[n:b] = 1
            self.block_tables[n:b, 0] = self.scratch_slot // bs
        with_lora = token_slots is not None
        if with_lora:
            self.token_slots[:n] = torch.tensor(token_slots, dtype=torch.int32).to(self.ids.device, non_blocking=True)
            self.token_slots[n:b] = -1
        graph, logits = self.graphs[(b, with_lora)]
        graph.replay()
        return logits[:n]
