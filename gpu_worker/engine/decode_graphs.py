"""Decode steps replayed from CUDA graphs.

A decode step is ~700 small kernels for a 16-layer model; launched one by one from Python that is 10-15 ms
of host time for a few ms of GPU work. Captured once per batch-size bucket, a step is one graph launch.
Inputs live in static buffers that each step refills; batches are padded up to the next bucket, and the
padding rows write their K/V into a scratch block that no sequence owns. Batches with an adapter and
batches without one have separate graphs, so base-only traffic never runs a LoRA op; and batches whose
adapters target only the attention projections (PEFT's default for Llama is q_proj + v_proj) replay graphs
that run LoRA on those projections alone (`LORA_VARIANTS`). Up to STACKED_MAX_BATCH rows, a LoRA graph
runs no LoRA kernel: each projection's GEMM takes the first P slots' A along (stacked under the base weight)
and the op after it expands the adapters' part (kernels/consumer_expand.py); a batch replays the graph of
the least P in `stacked_prefixes` past its adapters' slots (the slot table hands out the lowest free slot, and
the scheduler moves a running adapter down when its slot lies past the prefix its batch needs). Past it, a LoRA
variant has two graphs: one for any mix of adapters, and one for batches none of whose adapters holds more than the
backend's `spread_rows` sequences (many adapters, few sequences each), which runs the expand that is fastest for them
(`LoRAKernelMeta.spread`); a graph replayed for any batch cannot know the mix, so the mix picks the graph. Every
LoRA graph is captured once per rank stride the slots may be laid out at (SlotBuffers' rank classes), and a step
replays the current stride's.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import numpy as np
import torch

from .adapter_slots import stacked_prefixes
from .model.attention import DecodeMetadata, write_block_tables
from .model.llama import LlamaModel

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 256)
# The fused groups a LoRA graph runs LoRA on; a batch replays the first that covers its adapters' groups.
LORA_VARIANTS = (frozenset({"qkv"}), frozenset({"qkv", "o"}), frozenset({"qkv", "o", "gate_up", "down"}))


# Up to this many rows, LoRA graphs use the stacked GEMMs (past it, the LoRA kernels beside the base GEMMs).
STACKED_MAX_BATCH = 64


def graph_variants(lora) -> list[frozenset[str] | None]:
    """The LoRA variants graphs are captured for: None (no LoRA op), and LORA_VARIANTS when the LoRA backend's
    kernels read fixed-size device buffers only (`graphable`)."""
    return [None, *LORA_VARIANTS] if lora is not None and lora.graphable else [None]


def warm_up(run) -> None:
    """run() twice on a side stream before a capture: compiles the Triton kernels, warms cuBLAS."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)


def capture_graph(run, pool):
    """(graph, what run() returned) for run() captured into the memory pool `pool` (None: a new one, then
    graph.pool() for the next capture to share)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out


def lora_variant(groups: frozenset[str]) -> frozenset[str] | None:
    """The LoRA graph variant for a batch whose adapters target `groups` (None: no LoRA, the base graph)."""
    if not groups:
        return None
    return next(v for v in LORA_VARIANTS if groups <= v)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_caches, block_size: int, max_batch: int, max_model_len: int,
                 scratch_block: int, lora=None, overlap_lora: bool = True):
        dev = model.device
        self.model, self.kv_caches, self.lora = model, kv_caches, lora
        self.overlap_lora = overlap_lora  # LoRA beside the base GEMMs (TritonLoRA.prepare's overlap)
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
        # (bucket, LoRA variant or None, stacked P or None, spread, rank stride or None) -> (graph, its logits)
        self.graphs: dict[tuple[int, frozenset[str] | None, int | None, bool, int | None],
                          tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        stacked = lora is not None and getattr(lora, "graphable", False) and lora.buffers.stacked is not None
        self.prefixes = stacked_prefixes(lora.buffers.num_slots) if stacked else []
        self.stacked_max_batch = STACKED_MAX_BATCH  # as captured (benchmarks change the module's for other engines)
        # (kernels/ imports Triton: imported here, where graphs are made, not where the engine is)
        from kernels.step_inputs import decode_inputs, decode_inputs_ref, staged_size

        self._staged_size = staged_size
        self._spread_inputs = decode_inputs if dev.type == "cuda" else decode_inputs_ref
        self._staging = PinnedStaging(staged_size(n, self.max_blocks), dev)
        self._pool = None
        self.last: tuple[int, frozenset[str] | None, int | None, bool, int | None] | None = None  # the last step's

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _forward(self, b: int, lora: frozenset[str] | None, stacked: int | None, spread: bool,
                 rank_class: int | None) -> torch.Tensor:
        meta = DecodeMetadata(self.slot_mapping[:b], self.block_tables[:b], self.context_lens[:b])
        hook = None
        if lora:
            self.lora.hook.prepare(self.token_slots[:b], overlap=self.overlap_lora, groups=lora,
                                   stacked_slots=stacked, spread=self.lora.spread_rows if spread else None)
            hook = self.lora.hook
        return self.model.forward(self.ids[:b], self.positions[:b], meta, self.kv_caches, self.rows[:b], hook)

    def _warm_inputs(self) -> None:
        """Compile the inputs kernel's four variants (LoRA slots or not, patched ids or not) before serving, on a
        one-row step into the scratch block."""
        from kernels.step_inputs import decode_inputs, staged_size

        staged = torch.tensor([0, 0, self.scratch_slot, 1, -1, 0, 1, self.scratch_slot // self.block_size],
                              dtype=torch.int64, device=self.ids.device)
        assert staged.numel() == staged_size(1, 1)
        for lora in (False, True):
            for pending in (None, torch.zeros(1, dtype=torch.int64, device=self.ids.device)):
                decode_inputs(staged, pending, self.ids, self.positions, self.slot_mapping, self.context_lens,
                              self.token_slots, self.block_tables, 1, lora)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        self._warm_inputs()
        # Largest first: smaller graphs then fit in the memory pool the largest one reserved.
        for b in reversed(self.buckets):
            for key in self.keys(b):
                def forward(key=key):
                    return self._forward(*key)

                with self.lora.buffers.layout(key[4]) if key[4] is not None else nullcontext():
                    warm_up(forward)
                    graph, logits = capture_graph(forward, self._pool)
                self._pool = graph.pool()
                self.graphs[key] = (graph, logits)
        torch.cuda.synchronize()
        log.info("captured %d decode graphs in %.1fs", len(self.graphs), time.perf_counter() - t0)

    def keys(self, b: int) -> list[tuple[int, frozenset[str] | None, int | None, bool, int | None]]:
        """The graphs of bucket b (the module doc): the base graph; per LoRA variant and rank stride, one per stacked
        P, or one for any mix and, for buckets of at most the backend's `spread_tokens`, one for batches that spread
        their tokens."""
        spread = getattr(self.lora, "spread_tokens", 0) >= b
        keys = [(b, None, None, False, None)]
        for lora in graph_variants(self.lora)[1:]:
            for rank_class in self.lora.buffers.classes:
                for stacked in self._prefixes(b):
                    keys.append((b, lora, stacked, False, rank_class))
                    if stacked is None and spread:
                        keys.append((b, lora, None, True, rank_class))
        return keys

    def _prefixes(self, b: int) -> list[int | None]:
        """The stacked P a LoRA graph of bucket b is captured for ([None]: not stacked)."""
        return self.prefixes if self.prefixes and b <= self.stacked_max_batch else [None]

    def find(self, n: int, lora: frozenset[str] | None, token_slots: list[int] | None):
        """The graph a decode step of n sequences replays (its key for run()), or None: lora is the LoRA variant
        (`lora_variant`, None for the base graph), token_slots the sequences' slots (with lora)."""
        b = self.bucket(n)
        if b is None:
            return None
        stacked, spread, rank_class = None, False, None
        if lora:  # the least P past every slot (the last prefix holds all slots); None when b is not stacked
            rank_class = self.lora.buffers.rank_class
            top = max(token_slots) + 1
            stacked = next(p for p in self._prefixes(b) if p is None or p >= top)
            if stacked is None and (b, lora, None, True, rank_class) in self.graphs:  # none over spread_rows?
                spread = int(np.bincount(np.asarray(token_slots) + 1)[1:].max(initial=0)) <= self.lora.spread_rows
        key = (b, lora, stacked, spread, rank_class)
        return key if key in self.graphs else None

    def run(self, key, ids: list[int], positions: list[int], block_tables: list[list[int]],
            token_slots: list[int] | None, patch: tuple[list[int], list[int], torch.Tensor] | None = None
            ) -> torch.Tensor:
        """One decode step for len(ids) sequences -> logits [n, vocab] (a view into the graph's output), replaying
        the graph `find` returned. patch: (rows, source rows, ids) for tokens the host does not know yet:
        ids[source rows] on the device, sampled by the step in flight, go into those rows. token_slots: the
        sequences' slots for a LoRA graph (None: the base graph)."""
        n = len(ids)
        b, lora = key[0], key[1]
        bs = self.block_size
        # Every input in one int64 array, padded to the bucket on the host (padding rows: the scratch block,
        # one key, no adapter), so one copy moves it and one launch spreads it into the graph's buffers
        # (kernels/step_inputs.py has the layout): ids, positions, slots, context lengths, LoRA slots, the
        # patch (the row of the step in flight's ids each row takes, or -1), the tables' width, the tables.
        lens = np.fromiter(map(len, block_tables), np.int64, n)
        width = int(lens.max())
        host = self._staging.next(self._staged_size(b, width))
        cols = host[:6 * b].reshape(6, b)
        table = host[6 * b + 1:].reshape(b, width)
        pos = np.asarray(positions, dtype=np.int64)
        table.fill(self.scratch_slot // bs)
        write_block_tables(table, block_tables, lens)
        cols[0, :n] = ids
        cols[0, n:] = 0
        cols[1, :n] = pos
        cols[1, n:] = 0
        cols[2, :n] = table[np.arange(n), pos // bs] * bs + pos % bs
        cols[2, n:] = self.scratch_slot
        cols[3, :n] = pos + 1
        cols[3, n:] = 1
        cols[4, :n] = token_slots if token_slots is not None else -1
        cols[4, n:] = -1
        cols[5] = -1
        if patch is not None and patch[0]:
            cols[5, patch[0]] = patch[1]
        host[6 * b] = width
        dev = self._staging.to_device(host, self.ids.device)
        pending = patch[2] if patch is not None and patch[0] else None
        self._spread_inputs(dev, pending, self.ids, self.positions, self.slot_mapping, self.context_lens,
                            self.token_slots, self.block_tables, b, bool(lora))
        graph, logits = self.graphs[key]
        self.last = key
        graph.replay()
        return logits[:n]


class PinnedStaging:
    """Host buffers a step's inputs are written into and copied from, two in turn: pinned on CUDA so the copy
    is asynchronous; a buffer is written again only after the copy out of it (two steps back) has run."""

    def __init__(self, size: int, device: torch.device):
        pinned = device.type == "cuda"
        self._host = [torch.empty(size, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
        self._dev = torch.empty(size, dtype=torch.int64, device=device)
        self._copied = [None, None]
        self._turn = 0

    def next(self, size: int) -> np.ndarray:
        """The next buffer's first `size` entries, free to write."""
        self._turn ^= 1
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
        return self._host[self._turn][:size].numpy()

    def to_device(self, host: np.ndarray, device: torch.device) -> torch.Tensor:
        """Copy what next() handed out to the device (queued on the current stream); a view of the device copy."""
        size = host.shape[0]
        dev = self._dev[:size]
        dev.copy_(self._host[self._turn][:size], non_blocking=True)
        if dev.is_cuda:
            event = self._copied[self._turn] or torch.cuda.Event()
            event.record()
            self._copied[self._turn] = event
        return dev
