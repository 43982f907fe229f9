"""Steps with prompt tokens replayed from CUDA graphs cut at attention (piecewise graphs).

A step that is not pure decode (a prompt, or a chunk of one, joining the running decodes: every arrival makes
one) cannot replay a decode graph: its attention depends on how the step's tokens split into sequences, which
changes every step. Run eagerly, its ~1,000 launches (~300 with LoRA's, from Python) took an H200 host 12-20 ms
for a 1B model, against ~1.6 ms for a graphed decode step of the same batch. Here everything but attention is
captured, per token-count bucket and LoRA variant, as one CUDA graph per stretch between two attentions:

    piece 0:     embed, layer 0 up to attention (norm, q / k / v with their LoRA, RoPE, K / V into the cache)
    piece i:     layer i-1 after attention (o, norm, MLP, with their LoRA), layer i up to attention
    piece L:     layer L-1 after attention, the final norm over every row

and a step replays the pieces in order with the step's attention (mixed_attention, eager: one launch a layer for
decode rows and short prompt chunks) between each two. Inputs live in static buffers, padded to the bucket (padding
rows: token 0, position 0, K / V into the scratch block no sequence owns, no adapter); the pieces hand on through
static buffers too (q, h, attention's output), so one bucket's graphs hold no memory but their temporaries in the
shared pool. The logits are computed eagerly for the rows the step samples. LoRA: the step's token slots are
staged and the LoRA backend's metadata is computed inside piece 0, as in decode graphs; batches without an adapter
replay graphs without LoRA.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .decode_graphs import capture_graph, graph_variants, warm_up
from .model.llama import LlamaModel
from .model.mixed_attention import MixedMetadata, mixed_attention

log = logging.getLogger(__name__)

# Token counts a step is padded up to (steps of more tokens run eagerly: GPU-bound, the launches hide).
BUCKETS = (32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048)


@dataclass
class KVSlots:
    """What the pieces' RoPE + cache op reads of a step's metadata: where each row's K / V go."""

    slot_mapping: torch.Tensor


class MixedGraphs:
    def __init__(self, model: LlamaModel, kv_caches, max_tokens: int, scratch_block: int, block_size: int,
                 lora=None, overlap_lora: bool = True):
        dev, cfg = model.device, model.cfg
        self.model, self.kv_caches, self.lora, self.overlap_lora = model, kv_caches, lora, overlap_lora
        self.buckets = [b for b in BUCKETS if b <= max_tokens]
        self.scratch_slot = scratch_block * block_size
        n = self.buckets[-1] if self.buckets else 0
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.token_slots = torch.full((n,), -1, dtype=torch.int32, device=dev)
        # Between pieces: the rotated queries, the residual stream, attention's output; after the last, the
        # normed rows the logits are taken from.
        self.q = torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=model.dtype, device=dev)
        self.h = torch.zeros(n, cfg.hidden_size, dtype=model.dtype, device=dev)
        self.attn = torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=model.dtype, device=dev)
        self.x = torch.zeros(n, cfg.hidden_size, dtype=model.dtype, device=dev)
        # (bucket, LoRA variant or None, the slots' rank stride or None) -> the pieces, in order (each with replay())
        self.graphs: dict[tuple[int, frozenset[str] | None, int | None], list] = {}
        self._pool = None
        self.last: tuple[int, frozenset[str] | None, int | None] | None = None  # the key the last step replayed

    def _piece(self, i: int, b: int, lora: frozenset[str] | None) -> None:
        """Piece i of a step of b rows (the module doc): reads and writes the static buffers."""
        model, layers = self.model, len(self.model.layers)
        hook = self.lora.hook if lora else None
        if i == 0:
            if hook is not None:
                hook.prepare(self.token_slots[:b], overlap=self.overlap_lora, groups=lora)
            h, residual, delta = model.embed_tokens(self.ids[:b]), None, None
        else:
            h, residual, delta = model.after_attention(i - 1, self.attn[:b], self.h[:b], hook)
        if i == layers:
            self.x[:b].copy_(model.final_norm_rows(h, residual, delta))
            return
        q, h = model.before_attention(i, h, residual, delta, self.positions[:b], KVSlots(self.slot_mapping[:b]),
                                      self.kv_caches, hook)
        self.q[:b].copy_(q)
        self.h[:b].copy_(h)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pieces = range(len(self.model.layers) + 1)
        for b in reversed(self.buckets):  # largest first: the smaller ones' temporaries fit in its pool
            for lora in graph_variants(self.lora):
                # LoRA pieces: once per rank stride the slots may be laid out at (SlotBuffers' rank classes).
                for rank_class in self.lora.buffers.classes if lora else [None]:
                    with self.lora.buffers.layout(rank_class) if lora else nullcontext():
                        warm_up(lambda b=b, lora=lora: [self._piece(i, b, lora) for i in pieces])
                        graphs = []
                        for i in pieces:
                            graph, _ = capture_graph(lambda i=i, b=b, lora=lora: self._piece(i, b, lora), self._pool)
                            self._pool = graph.pool()
                            graphs.append(graph)
                    self.graphs[(b, lora, rank_class)] = graphs
        torch.cuda.synchronize()
        log.info("captured %d mixed-step graph pieces in %.1fs", sum(map(len, self.graphs.values())),
                 time.perf_counter() - t0)

    def find(self, n: int, lora: frozenset[str] | None):
        """The key a step of n tokens replays (lora: its LoRA variant, None for none), or None (run it eagerly)."""
        b = next((b for b in self.buckets if b >= n), None)
        key = (b, lora, self.lora.buffers.rank_class if lora else None)
        return key if key in self.graphs else None

    def run(self, key, input_ids: torch.Tensor, positions: torch.Tensor, meta: MixedMetadata,
            token_slots: torch.Tensor | None, logits_rows: torch.Tensor) -> torch.Tensor:
        """A step of T = len(input_ids) tokens (ids and positions on the device), its attention metadata built for
        those T rows, each token's LoRA slot (int32 [T], for a LoRA key) -> logits for logits_rows."""
        b, lora, _ = key
        t = input_ids.shape[0]
        self.ids[:t].copy_(input_ids)
        self.ids[t:b].zero_()
        self.positions[:t].copy_(positions)
        self.positions[t:b].zero_()
        self.slot_mapping[:t].copy_(meta.slot_mapping)
        self.slot_mapping[t:b].fill_(self.scratch_slot)
        if lora:
            self.token_slots[:t].copy_(token_slots)
            self.token_slots[t:b].fill_(-1)
        pieces = self.graphs[key]
        self.last = key
        for i, piece in enumerate(pieces[:-1]):
            piece.replay()
            k_cache, v_cache = self.kv_caches[i]
            mixed_attention(self.q[:t], k_cache, v_cache, meta, self.model.scale, out=self.attn[:t])
        pieces[-1].replay()
        return self.model.logits(self.x[logits_rows])
