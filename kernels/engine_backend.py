"""The engine's LoRA hook on the GPU: `TorchLoRA`'s contract (`apply(layer, group, x, out)`) over the same
SlotBuffers, with the Triton kernels.

    meta = LoRAKernelMeta(max_tokens, max_loras, device)    # once, at engine start
    hook = TritonLoRA(buffers, meta)
    hook.prepare(token_slots, distinct, overlap)            # every step, before the forward
    model.forward(..., lora=hook)

With `stacked_slots` (the engine's decode graphs, up to EXPAND_MAX_ROWS tokens) the STACKED_GROUPS (and gate_up, for up
to STACKED_GATE_UP_MAX_SLOTS slots) run no LoRA
kernel: each is one GEMM over the base weight with the first P slots' A under it (SlotBuffers.attach_base),
and the op that reads its output expands the adapters' part itself (kernels/consumer_expand.py); the other
projections run as with overlap.

With overlap (the engine's CUDA graphs past that), each projection's shrink and expand run on a side stream
while the base GEMM runs on the main one, and the adapters' part comes back as a delta (values, slots) that the next
elementwise op adds (kernels/elementwise.py) instead of an in-place add after the GEMM: at decode sizes the
LoRA launches are latency, not bandwidth, and hide behind the GEMM's (H200, Llama-3.2-1B layer, 64 tokens of
8 rank-16 adapters: LoRA added 40 us a layer serially, 20 overlapped). In a graph the fork and join are free
edges; eagerly they would cost host time at every projection, so eager steps add in place, but for gate_up
(EAGER_PENDING_GROUPS): with the fused elementwise ops, silu_mul expands its shrink's y itself.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .consumer_expand import PendingExpand
from .elementwise import EXPAND_MAX_ROWS
from .l2_prefetch import Blocks
from .lora_expand import expand_launch
from .lora_shrink import default_config, shrink_launch, shrink_workspace
from .lora_shrink_rows import MAX_TOKENS as ROWS_MAX_TOKENS
from .lora_shrink_rows import shrink_rows_config, shrink_rows_launch
from .metadata import LoRAKernelMeta

# The projections stacked steps run stacked. gate_up too while P is at most STACKED_GATE_UP_MAX_SLOTS: its
# silu_mul expand reads every one of the P slots' B for 2 x 8,192 columns (H200, 64 rows: 6.4 us at P = 8, 10 at
# P = 32 with its loop pipelined, against 1.7 for silu_mul alone); past that its LoRA kernels run beside the base
# GEMM as with overlap (the longest GEMM of a layer: they partly hide behind it, but slow it, and at P = 32 the
# expand outlasted it). H200, graph replay, 32 adapters at P = 32, stacked against beside: batch 64 1,680 against
# 1,740 us, batch 32 1,588 against 1,662 (scratch probe, two engines each).
STACKED_GROUPS = frozenset({"qkv", "o", "down"})
STACKED_GATE_UP_MAX_SLOTS = 32
# Eager steps (prompts past the mixed graphs' buckets) hand these groups' adapters' part on to the op that reads the
# projection (`consumer_expands`): the shrink runs, the expand is done by silu_mul in tiles of one prompt's rows,
# instead of an expand that reads and writes gate_up's whole output again (8,192 tokens: 537 MB a layer).
EAGER_PENDING_GROUPS = frozenset({"gate_up"})
# Stacked steps of up to PREFETCH_B_MAX_SLOTS slots ask each layer's B of the stacked groups (the first P slots')
# into L2 from the layer's norms (kernels/l2_prefetch.py says why): the input norm asks for the first run of them
# (all four groups while gate_up is stacked; else qkv and o), the post-attention norm for the rest (down).
PREFETCH_B = True
# Past it the bytes asked for (P slots' whether used or not, with the evict-last hint) crowd the L2: H200, 32
# adapters mixed at P = 32, all groups asked for, graph replay 1,800 -> 1,866 us (batch 64), 1,708 -> 1,778 (32).
# Leaving gate_up's B out at P = 32 (qkv, o and down asked for, 7.2 MB a layer) gained nothing either: batch 32
# 1,433 against 1,429 us without asking, batch 64 1,549 / 1,546 (twenty-fourth session).
PREFETCH_B_MAX_SLOTS = 16


def prefetch_span(runs: list[tuple[int, int]], norm: str) -> tuple[int, int] | None:
    """Of a layer's B runs in a slot's row ((offset, values), in order), the [start, end) the `norm` asks for:
    the first run at the input norm, the rest (start to end, over any gap) at the post-attention norm."""
    runs = runs[:1] if norm == "input" else runs[1:]
    return (runs[0][0], runs[-1][0] + runs[-1][1]) if runs else None


class _GroupShape(Protocol):
    slice_offsets: tuple[int, ...]


class SlotBuffersLike(Protocol):
    """What TritonLoRA reads of gpu_worker.engine.lora.slot_buffers.SlotBuffers."""

    a: list[dict[str, torch.Tensor]]  # [layer][group]: [slots, S, R, in]
    b: list[dict[str, list[torch.Tensor]]]  # [layer][group][slice]: [slots, out_s, R]
    shapes: dict[str, _GroupShape]
    ranks: torch.Tensor  # [slots] int32
    stacked: list[dict[str, torch.Tensor]] | None  # [layer][group]: [N + slots * S * R, in], base then A
    b_flat: torch.Tensor  # [slots, values]: every slot's B, in one row a slot

    def b_runs(self, layer: int, groups: frozenset[str] | None = None) -> list[tuple[int, int]]:
        """(offset, values) runs of b_flat's rows holding layer's B of `groups`."""


class TritonLoRA:
    """LoRAHook over SlotBuffers: shrink + expand per projection, metadata shared by the whole step."""

    def __init__(self, buffers: SlotBuffersLike, meta: LoRAKernelMeta, consumer_expands: bool = False):
        """consumer_expands: the model's elementwise ops are the fused kernels, which expand a PendingExpand
        themselves (eager steps hand EAGER_PENDING_GROUPS on to them; the torch ops would expand it slot by
        slot)."""
        self.buffers = buffers
        self.meta = meta
        self.consumer_expands = consumer_expands
        # One fp32 y and one split-K scratch for every projection (they run one after another on one
        # stream): they grow to the largest step seen, instead of an allocation per layer and projection.
        self._y: torch.Tensor | None = None
        self._scratch: torch.Tensor | None = None
        # Buffers replaced by larger ones, kept alive: a CUDA graph captured with the old one (decode graphs
        # capture launches that point at y and the scratch) would otherwise replay into freed memory.
        self._outgrown: list[torch.Tensor] = []
        # (group, accumulate) -> ((tokens, strides), y, shrink launch, expand launch): every layer of a step has
        # the same shapes and metadata, so the checks, configs and grids are worked out once per group and step,
        # not per layer.
        self._plans: dict[tuple[str, bool], tuple] = {}
        self._slots: torch.Tensor | None = None
        self._overlap = False
        self._groups: frozenset[str] | None = None
        self._side: torch.cuda.Stream | None = None
        self._deltas: dict[str, torch.Tensor] = {}  # group -> this step's [T, N] buffer for the adapters' part
        self._stacked_slots: int | None = None
        self._stacked_groups = STACKED_GROUPS
        self._biases: dict[tuple[int, str, int], torch.Tensor] = {}  # zero-padded to a stacked GEMM's rows

    def prepare(self, token_slots: torch.Tensor, distinct: int | None = None, overlap: bool = False,
                groups: frozenset[str] | None = None, stacked_slots: int | None = None,
                spread: int | None = None) -> None:
        """This step's tokens -> slots; call once per step before the forward. distinct: how many slots
        the step holds, when the caller knows it (not in a graph replayed for other batches). spread: a bound on
        the tokens of any one slot (`LoRAKernelMeta.spread`; a graph captured for such batches). overlap: the
        adapters' part beside the base GEMM, as a delta (the module doc; on CUDA, for graphs). groups: the
        fused groups the step's adapters target (None: all); projections of other groups run no LoRA launch.
        stacked_slots: P, more than any token's slot: each projection's GEMM takes the first P slots' A along
        and hands the adapters' part on unexpanded (the module doc; steps of up to EXPAND_MAX_ROWS tokens, with
        the A stacked under the base weights)."""
        if stacked_slots is not None and (self.buffers.stacked is None or token_slots.shape[0] > EXPAND_MAX_ROWS
                                          or not 0 < stacked_slots <= self.buffers.ranks.shape[0]):
            raise ValueError(f"stacked_slots={stacked_slots} needs A stacked under the base weights, 1 to "
                             f"{self.buffers.ranks.shape[0]} slots and at most {EXPAND_MAX_ROWS} tokens "
                             f"(got {token_slots.shape[0]})")
        self._stacked_slots = stacked_slots
        # The metadata serves the LoRA kernels alone: a stacked step whose groups all run stacked launches none.
        self._stacked_groups = STACKED_GROUPS if stacked_slots is None or stacked_slots > STACKED_GATE_UP_MAX_SLOTS \
            else STACKED_GROUPS | {"gate_up"}
        if stacked_slots is None or groups is None or not groups <= self._stacked_groups:
            self.meta.prepare(token_slots, distinct, spread)
        self._plans = {}
        self._slots = token_slots
        self._overlap = overlap
        self._groups = groups
        self._deltas = {}

    def layer_prefetch(self, layer: int, norm: str) -> Blocks | None:
        """What the layer's `norm` ("input" or "post") asks into L2 in a stacked step (PREFETCH_B): the first P
        slots' B of the stacked groups, their first run at the input norm, the rest (as one run) at the post-
        attention norm; None otherwise."""
        if self._stacked_slots is None or self._stacked_slots > PREFETCH_B_MAX_SLOTS or not PREFETCH_B \
                or self.buffers.b_flat.device.type != "cuda":
            return None
        groups = self._stacked_groups if self._groups is None else self._stacked_groups & self._groups
        span = prefetch_span(self.buffers.b_runs(layer, groups), norm)
        if span is None:
            return None
        flat = self.buffers.b_flat
        size = flat.element_size()
        return Blocks(flat.data_ptr() + span[0] * size, self._stacked_slots, flat.stride(0) * size,
                      (span[1] - span[0]) * size)

    def _runs(self, group: str) -> bool:
        return self._groups is None or group in self._groups

    def _grown(self, old: torch.Tensor | None, need: int, device: torch.device) -> torch.Tensor:
        """A float32 buffer of at least `need` elements and at least twice the old one's (so buffers are
        replaced a few times, not at every larger step); the old one is kept alive (`_outgrown`)."""
        if old is not None:
            self._outgrown.append(old)
            need = max(need, 2 * old.numel())
        return torch.empty(need, dtype=torch.float32, device=device)

    def _plan(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor, accumulate: bool = True) -> tuple:
        # The launches bake in the strides of x and out: a plan serves calls with the same ones.
        key = (x.shape[0], x.stride(), out.stride())
        t = key[0]
        plan = self._plans.get((group, accumulate))
        if plan is None or plan[0] != key:
            a = self.buffers.a[layer][group]
            s, r = a.shape[1], a.shape[2]
            if self._y is None or self._y.numel() < t * s * r:
                self._y = self._grown(self._y, t * s * r, x.device)
            y = self._y[: t * s * r].view(t, s, r)
            if t <= ROWS_MAX_TOKENS:  # decode sizes: a program per token (lora_shrink_rows.py says why)
                shrink = shrink_rows_launch(x, a, self.buffers.ranks, self._slots, y,
                                            shrink_rows_config(a.shape[3], s * r))
            else:
                cfg = default_config(x, a, self.meta)
                need = max(1, shrink_workspace(x, a, self.meta, cfg))
                if self._scratch is None or self._scratch.numel() < need:
                    # A new scratch: launches planned with the old one for other groups are planned again.
                    self._scratch = self._grown(self._scratch, need, x.device)
                    self._plans = {}
                shrink = shrink_launch(x, a, self.buffers.ranks, self.meta, y, cfg, self._scratch)
            # The expand's launch config: lora_expand's default for these widths and this step's metadata.
            plan = self._plans[(group, accumulate)] = (
                key, y, shrink,
                expand_launch(y, self.buffers.b[layer][group], out, self.buffers.ranks, self.meta,
                              slice_offsets=self.buffers.shapes[group].slice_offsets, accumulate=accumulate))
        return plan

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add the adapters' contribution for projection `group` of `layer` into `out` in place."""
        if not self._runs(group):
            return
        y, expand = self._shrink(layer, group, x, out)
        expand(y, self.buffers.b[layer][group], out)

    def _shrink(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, object]:
        """The segmented (or per-token) shrink of x into this step's y; returns (y, the planned expand into out)."""
        _, y, shrink, expand = self._plan(layer, group, x, out)
        shrink(x, self.buffers.a[layer][group], y)
        return y, expand

    def project(self, layer: int, group: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | PendingExpand | None]:
        """F.linear(x, weight, bias) with the adapters' part for projection `group` of `layer`: added in place
        (returns (out, None)); with overlap, computed beside it and returned as (out, (delta [T, N], slots [T]))
        for the next elementwise op to add (delta's rows of tokens without an adapter are not written); with
        stacked_slots, (out, PendingExpand) for the next op to expand and add."""
        if self._stacked_slots is not None and group in self._stacked_groups and self._runs(group):
            return self._stacked(layer, group, x, weight, bias)
        if self.consumer_expands and not self._overlap and self._stacked_slots is None \
                and group in EAGER_PENDING_GROUPS and self._runs(group):
            return self._shrunk(layer, group, x, weight, bias)
        if not self._overlap or not self._runs(group):
            out = F.linear(x, weight, bias)
            self.apply(layer, group, x, out)
            return out, None
        bs = self.buffers.b[layer][group]
        width = self.buffers.shapes[group].slice_offsets[-1] + bs[-1].shape[1]
        delta = self._deltas.get(group)
        if delta is None or delta.shape != (x.shape[0], width):
            delta = self._deltas[group] = torch.empty((x.shape[0], width), dtype=x.dtype, device=x.device)
        # Planned (and y, scratch, delta allocated) on the main stream, before the fork: the side stream only
        # launches.
        _, y, shrink, expand = self._plan(layer, group, x, delta, accumulate=False)
        if x.device.type != "cuda":  # no streams (the interpreter, in tests): the same work, one after another
            shrink(x, self.buffers.a[layer][group], y)
            expand(y, bs, delta)
            return F.linear(x, weight, bias), (delta, self._slots)
        if self._side is None:
            self._side = torch.cuda.Stream(x.device)
        main = torch.cuda.current_stream(x.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            shrink(x, self.buffers.a[layer][group], y)
            expand(y, bs, delta)
        out = F.linear(x, weight, bias)
        main.wait_stream(self._side)
        return out, (delta, self._slots)

    def _shrunk(self, layer: int, group: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> tuple[torch.Tensor, PendingExpand]:
        """The base output and the segmented shrink's y, handed on unexpanded: y [T, S, R] stands for every slot
        (a zero stride over P, the slot count), and the consumer reads each row's own slot of it."""
        out = F.linear(x, weight, bias)
        y, _ = self._shrink(layer, group, x, out)
        p = self.buffers.ranks.shape[0]
        return out, PendingExpand(y[:, None].expand(y.shape[0], p, *y.shape[1:]), tuple(self.buffers.b[layer][group]),
                                  self.buffers.ranks, self._slots)

    def _stacked(self, layer: int, group: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                 ) -> tuple[torch.Tensor, PendingExpand]:
        """One GEMM over the base weight and the first P slots' A under it: the base output (a view) and every
        token's shrink for those slots, handed on unexpanded."""
        stacked, a = self.buffers.stacked[layer][group], self.buffers.a[layer][group]
        n, (s, r) = weight.shape[0], a.shape[1:3]
        if weight.data_ptr() != stacked.data_ptr() or weight.shape[1] != stacked.shape[1]:
            raise ValueError(f"layer {layer} {group}: the model's weight is not the one the slots' A is stacked under")
        rows = n + self._stacked_slots * s * r
        if bias is not None:
            key = (layer, group, rows)
            if key not in self._biases:
                self._biases[key] = torch.cat([bias, bias.new_zeros(rows - n)])
            bias = self._biases[key]
        out = F.linear(x, stacked[:rows], bias)
        y = out[:, n:].view(x.shape[0], self._stacked_slots, s, r)
        return out[:, :n], PendingExpand(y, tuple(self.buffers.b[layer][group]), self.buffers.ranks, self._slots)
