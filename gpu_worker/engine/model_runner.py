"""One engine step on the device: lay out the scheduled chunks as a flat batch, run the model, sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode_graphs import DecodeGraphs, lora_variant
from .lora.backends import LoRABackend, token_slots_of
from .mixed_graphs import MixedGraphs
from .model.attention import DecodeMetadata
from .model.llama import LlamaModel
from .model.mixed_attention import MixedMetadata
from .sampler import Sampler, SamplerOutput, SamplingBatch, warm_greedy
from .scheduler import ScheduledChunk


@dataclass
class StepResult:
    # The chunks that completed their sequence's tokens, in the order of `sampled`'s rows.
    completed: list[ScheduledChunk]
    sampled: SamplerOutput | None


@dataclass
class PendingTokens:
    """The token ids a step still in flight samples, on the device, and each sequence's row among them: the
    next step's input for those sequences (async scheduling), copied on the device, never through the host."""

    token_ids: torch.Tensor
    row_of: dict


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 ids to `device`; on CUDA through pinned memory, so the host does not wait for the device."""
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        lora: LoRABackend | None,
        eos_token_id: int | None,
        fused_prefill: bool | None = None,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.lora = lora
        self.device = model.device
        self.eos_token_id = eos_token_id
        self.sampler = Sampler()
        cfg = model.cfg
        # The fused attention kernels want head dims a power of 2 of at least 16 and no sliding window; decode's
        # also power-of-2 blocks of at least 16, and CUDA. With fused_prefill (None: on CUDA) the paged prefill
        # kernel takes a mixed step's decode rows, short first chunks and chunks with a cached prefix in one launch.
        fits = cfg.head_dim >= 16 and not cfg.head_dim & (cfg.head_dim - 1) and cfg.sliding_window is None
        self.fused_decode = fits and model.device.type == "cuda" and block_size >= 16
        self.fused_prefill = fits and (model.device.type == "cuda" if fused_prefill is None else fused_prefill)
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None  # steps with prompt tokens, cut at attention

    @torch.inference_mode()
    def warm_prompt_path(self, scratch_block: int) -> None:
        """Compile the kernels of a step that is not pure decode before serving: a first two-token chunk, one with a
        cached prefix and a decode row through the model, their K/V in the scratch block no sequence owns (a first
        compile of the paged prefill kernel inside a step stalled it ~1 s on an H200), and the greedy pick over its
        logits (decode steps' logits are laid out alike)."""
        meta, rows = self._warm_step(scratch_block)
        warm_greedy(self.model.forward(torch.zeros_like(rows), rows, meta, self.kv_caches, rows[[1, 3, 4]], None))

    def _warm_step(self, scratch_block: int) -> tuple[MixedMetadata, torch.Tensor]:
        meta = MixedMetadata.build([0, 2, 4], [2, 2, 1], [[scratch_block]] * 3, self.block_size, self.device,
                                   self.model.cfg.sliding_window, self.fused_decode, self.fused_prefill)
        return meta, torch.arange(5, device=self.device)

    def enable_graphs(self, max_batch: int, max_model_len: int, scratch_block: int, overlap_lora: bool = True) -> None:
        if not self.fused_decode:
            return
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, max_batch, max_model_len,
                                   scratch_block, self.lora, overlap_lora)
        self.graphs.capture()

    @torch.inference_mode()
    def enable_mixed_graphs(self, max_tokens: int, scratch_block: int, overlap_lora: bool = True) -> None:
        """Steps with prompt tokens (up to max_tokens of them) replay graph pieces between eager attentions
        (mixed_graphs.py); on CUDA, with the paged prefill kernel."""
        if not (self.fused_prefill and self.device.type == "cuda"):
            return
        self.mixed_graphs = MixedGraphs(self.model, self.kv_caches, max_tokens, scratch_block, self.block_size,
                                        self.lora, overlap_lora)
        self.mixed_graphs.capture()
        key = self.mixed_graphs.find(5, None)
        if key is not None:  # the pieces and the eager attention between them, once, before serving
            meta, rows = self._warm_step(scratch_block)
            self.mixed_graphs.run(key, torch.zeros_like(rows), rows, meta, None, rows[[1, 3, 4]])

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], rows: dict, pending: PendingTokens | None = None) -> StepResult:
        """rows: seq -> SamplingRow for every sequence that may be sampled this step. Returns without waiting
        for the device. pending: the step in flight, whose sampled ids are some sequences' last token here."""
        # Group tokens by adapter slot, so each adapter's tokens are one contiguous segment.
        chunks = sorted(chunks, key=lambda c: c.seq.slot)
        ids: list[int] = []
        positions: list[int] = []
        logits_rows: list[int] = []
        completed: list[ScheduledChunk] = []
        patch_rows: list[int] = []  # rows of `ids` whose token the step in flight samples
        patch_src: list[int] = []  # ... and their rows in pending.token_ids
        for c in chunks:
            seq, start = c.seq, c.start
            end = start + c.num_tokens
            n_prompt, out = len(seq.prompt_token_ids), seq.output_token_ids
            known = n_prompt + len(out)  # seq.num_known_tokens
            if end == start + 1 and n_prompt <= start < known:  # a decode token the host knows: the common case
                ids.append(out[start - n_prompt])
            else:
                ids.extend(seq.token_ids(start, min(end, known)))
            if end > known:  # only ever the last token, sampled by the previous step
                patch_rows.append(len(ids))
                patch_src.append(pending.row_of[seq])
                ids.append(0)
            positions.extend(range(start, end))
            if end == known + seq.pending:  # c.completes
                logits_rows.append(len(ids) - 1)
                completed.append(c)
        # A batch with no adapter runs no LoRA op at all: base requests pay nothing for LoRA being on (on the host
        # either: the chunks are in slot order, so the last one's slot says whether any has an adapter). Nor do the
        # projections no adapter of the batch targets.
        any_adapter = self.lora is not None and bool(chunks) and chunks[-1].seq.slot >= 0
        slots = [c.seq.slot for c in chunks] if any_adapter else None
        groups = self.lora.buffers.groups_used(slots) if any_adapter else frozenset()
        with_lora = bool(groups)
        decode = self.fused_decode and len(ids) == len(chunks) == len(completed)
        variant = lora_variant(groups)
        slots = slots if with_lora else None
        graph = self.graphs.find(len(ids), variant, slots) if decode and self.graphs is not None else None
        if graph is not None:
            patch = (patch_rows, patch_src, pending.token_ids) if patch_rows else None
            logits = self.graphs.run(graph, ids, positions, [c.seq.block_table for c in chunks], slots, patch)
            batch = SamplingBatch.build([rows[c.seq] for c in completed], logits.shape[-1], self.device)
            return StepResult(completed, self.sampler(logits, batch))
        mixed = self.mixed_graphs.find(len(ids), variant) if not decode and self.mixed_graphs is not None else None
        if decode:
            meta = DecodeMetadata.build(positions, [c.seq.block_table for c in chunks], self.block_size, self.device)
        else:
            meta = MixedMetadata.build(
                [c.start for c in chunks],
                [c.num_tokens for c in chunks],
                [c.seq.block_table for c in chunks],
                self.block_size,
                self.device,
                self.model.cfg.sliding_window,
                self.fused_decode,
                self.fused_prefill,
            )
        runs = [(c.seq.slot, c.num_tokens) for c in chunks]
        hook = self.lora.bind(runs, groups) if with_lora and mixed is None else None
        if not completed:
            # Only partial prefill chunks: fill the cache, sample nothing.
            logits_rows = [len(ids) - 1]
        n, k = len(ids), len(patch_rows)
        # The positions start 16-byte aligned whatever n: Triton compiles a kernel per alignment of its pointers
        # (RoPE + cache took a second compile inside a served step, for the odd token counts).
        pad = n & 1
        host = to_device(ids + [0] * pad + positions + logits_rows + patch_rows + patch_src, self.device)
        input_ids, input_positions = host[:n], host[n + pad:2 * n + pad]
        if k:
            index = host[-2 * k:]
            input_ids.index_copy_(0, index[:k], pending.token_ids.index_select(0, index[k:]))
        logits_at = host[2 * n + pad:2 * n + pad + len(logits_rows)]
        if mixed is not None:
            lora_slots = token_slots_of(runs, self.device) if with_lora else None
            logits = self.mixed_graphs.run(mixed, input_ids, input_positions, meta, lora_slots, logits_at)
        else:
            logits = self.model.forward(input_ids, input_positions, meta, self.kv_caches, logits_at, hook)
        if not completed:
            return StepResult([], None)
        batch = SamplingBatch.build([rows[c.seq] for c in completed], logits.shape[-1], self.device)
        return StepResult(completed, self.sampler(logits, batch))

