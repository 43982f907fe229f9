"""Per-step LoRA metadata: the batch's tokens sorted and segmented by adapter slot, once per engine step.

Every shrink/expand launch of the step (4 projections x 32 layers on Llama-3-8B: 256 launches) reads the
same few buffers, so the sort is paid once. It runs as one Triton launch into buffers preallocated for
`max_tokens` and `max_slots`: no host sync, no allocation, nothing whose size depends on the data, so
`prepare` can be captured in a CUDA graph together with the layers that use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_pow2

# The composite sort key is (key << 16 | position in chunk) in int32: chunks up to 2**16 tokens and keys
# (slot ids, plus two reserved bins) below 2**15.
_MAX_CHUNK = 1 << 16
_MAX_SLOTS = (1 << 15) - 2


@triton.jit
def _keys(slots_ptr, idx, T, MAX_SLOTS: tl.constexpr, BINS: tl.constexpr):
    """Sort key of tokens `idx`: the slot; MAX_SLOTS for "no adapter" (so those sort last); BINS - 1 for
    lanes past the end of the batch (a dump bin nobody reads)."""
    s = tl.load(slots_ptr + idx, mask=idx < T, other=-1)
    key = tl.where((s < 0) | (s >= MAX_SLOTS), MAX_SLOTS, s)
    return tl.where(idx < T, key, BINS - 1)


# T (the step's tokens) unspecialised: the warm-up's token counts then cover every step's (T only bounds loops and
# masks); specialised, a count that is not a multiple of 16 compiled a kernel inside a served step.
@triton.jit(do_not_specialize=["T"])
def _prepare_kernel(
    slots_ptr, sorted_ptr, sorted_slots_ptr, active_ptr, start_ptr, len_ptr, num_active_ptr, T,
    MAX_SLOTS: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr,
):
    # A stable counting sort, one program per CHUNK tokens. Each program histograms the whole batch
    # (T <= 16K tokens is <= 64 KB of int32 from L2, cheaper than a second launch to share it) to get
    # every slot's segment start and how many tokens of each slot precede its chunk; it then sorts its
    # chunk by (slot, position) and scatters each token to start + earlier + rank within the chunk.
    pid = tl.program_id(0)
    offs = tl.arange(0, CHUNK)
    total = tl.zeros([BINS], dtype=tl.int32)
    before = tl.zeros([BINS], dtype=tl.int32)
    for c in range(0, (T + CHUNK - 1) // CHUNK):
        h = tl.histogram(_keys(slots_ptr, c * CHUNK + offs, T, MAX_SLOTS, BINS), BINS)
        total += h
        before += tl.where(c < pid, h, 0)
    start = tl.cumsum(total, 0) - total  # exclusive prefix sum: where each slot's segment begins

    keys = _keys(slots_ptr, pid * CHUNK + offs, T, MAX_SLOTS, BINS)
    mine = tl.histogram(keys, BINS)
    packed = tl.sort((keys << 16) | offs)  # stable by construction: ties broken by position
    key_sorted = packed >> 16
    local = packed & 0xFFFF
    # The i-th element of the sorted chunk with key k goes to start[k] + before[k] + (i - first i of k).
    base = start + before - (tl.cumsum(mine, 0) - mine)
    dest = tl.gather(base, key_sorted, 0) + offs
    tl.store(sorted_ptr + dest, pid * CHUNK + local, mask=key_sorted < BINS - 1)
    tl.store(sorted_slots_ptr + dest, tl.where(key_sorted < MAX_SLOTS, key_sorted, -1), mask=key_sorted < BINS - 1)

    if pid == 0:
        # The active slots in ascending order, compacted; entries past num_active get slot -1 and
        # length 0, so a kernel can read all max_slots entries without first reading num_active.
        bins = tl.arange(0, BINS)
        active = (total > 0) & (bins < MAX_SLOTS)
        pos = tl.cumsum(active.to(tl.int32), 0) - 1
        n = tl.sum(active.to(tl.int32), 0)
        tl.store(active_ptr + pos, bins, mask=active)
        tl.store(start_ptr + pos, start, mask=active)
        tl.store(len_ptr + pos, total, mask=active)
        tail = (bins >= n) & (bins < MAX_SLOTS)
        tl.store(active_ptr + bins, tl.full([BINS], -1, tl.int32), mask=tail)
        tl.store(start_ptr + bins, tl.zeros([BINS], tl.int32), mask=tail)
        tl.store(len_ptr + bins, tl.zeros([BINS], tl.int32), mask=tail)
        tl.store(num_active_ptr, n)


@dataclass
class LoRAKernelMeta:
    """The step's token -> adapter layout, in buffers preallocated on `device` and refilled by `prepare`.

    LoRAKernelMeta(max_tokens, max_slots, device) allocates; after `prepare(token_slots)` with T tokens
    (S = max_slots):
      sorted_tokens[:T]  int32: token indices ordered by slot (stable); tokens without an adapter last.
      sorted_slots[:T]   int32: the slot of each of those tokens (-1: none).
      active_slots[:S]   int32: the slots present, ascending, then -1.
      seg_start[:S]      int32: where active_slots[i]'s tokens begin in sorted_tokens (0 past the end).
      seg_len[:S]        int32: how many tokens use active_slots[i] (0 past the end).
      num_active[0]      int32: how many slots are present (on device: kernels never need it on the host).
    `num_tokens` is T, a host int: the kernels size their grids from it, never from device data.
    `distinct` is an optional host-side count of the slots present (the engine knows it from the batch it
    schedules, without a sync): it tightens the grid bound and lets the launch configs pick row tiles that
    fit each adapter's tokens (2,048 tokens over 128 adapters are 16 rows each, not 128-row tiles
    that are 7/8 masked). It must not be smaller than the real count, or tiles would be skipped; a graph
    captured once and replayed for other batches passes None (every slot may be present).
    `spread` is an optional host-side bound on the tokens of any one slot (the engine's decode graphs for batches
    that spread their tokens over many adapters: `kernels.lora_expand_rows.SPREAD_ROWS`). Only the choice of
    kernel reads it (a bound that is too small makes a launch slower, never wrong); None: unknown.
    `chunk` (a power of two) is how many tokens one program of the sort handles; tests shrink it.
    `semaphores` is scratch for the kernels of the step, not metadata: int32 counters, zero between
    launches, that split-K shrink uses to find the last split of each tile (it re-arms them itself). One
    per (row tile, column tile) of a launch: (max_tokens // 16 + max_slots) x 64.
    """

    max_tokens: int
    max_slots: int
    device: torch.device | str
    chunk: int = 1024
    num_tokens: int = field(default=0, init=False)
    distinct: int | None = field(default=None, init=False)
    spread: int | None = field(default=None, init=False)
    sorted_tokens: torch.Tensor = field(init=False)
    sorted_slots: torch.Tensor = field(init=False)
    active_slots: torch.Tensor = field(init=False)
    seg_start: torch.Tensor = field(init=False)
    seg_len: torch.Tensor = field(init=False)
    num_active: torch.Tensor = field(init=False)
    semaphores: torch.Tensor = field(init=False)

    def __post_init__(self):
        if not 0 < self.max_slots <= _MAX_SLOTS:
            raise ValueError(f"max_slots must be in [1, {_MAX_SLOTS}], got {self.max_slots}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.chunk & (self.chunk - 1) or not 16 <= self.chunk <= _MAX_CHUNK:
            raise ValueError(f"chunk must be a power of two in [16, {_MAX_CHUNK}], got {self.chunk}")
        self.device = torch.device(self.device)
        if self.device.type == "cuda" and self.device.index is None:  # tensors report cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.chunk = min(self.chunk, max(16, next_pow2(self.max_tokens)))

        def i32(n: int, fill: int) -> torch.Tensor:
            return torch.full((n,), fill, dtype=torch.int32, device=self.device)

        self.sorted_tokens = i32(self.max_tokens, 0)
        self.sorted_slots = i32(self.max_tokens, -1)
        self.active_slots = i32(self.max_slots, -1)
        self.seg_start = i32(self.max_slots, 0)
        self.seg_len = i32(self.max_slots, 0)
        self.num_active = i32(1, 0)
        self.semaphores = i32((self.max_tokens // 16 + self.max_slots) * 64, 0)

    def prepare(self, token_slots: torch.Tensor, distinct: int | None = None, spread: int | None = None) -> None:
        """Fill the buffers for this step's tokens. token_slots: [T] int32 on `device`, each in
        [-1, max_slots) (-1: no adapter; ids past max_slots are treated as -1: checking them would need
        a host sync). distinct, spread: see the class doc (None: unknown). Graph-capturable: one kernel launch,
        no sync, no allocation."""
        if token_slots.dim() != 1 or token_slots.dtype != torch.int32:
            raise ValueError(f"token_slots must be a 1-D int32 tensor, got {token_slots.dtype} "
                             f"{tuple(token_slots.shape)}")
        if token_slots.device != self.device:
            raise ValueError(f"token_slots is on {token_slots.device}, the metadata on {self.device}")
        t = token_slots.shape[0]
        if t > self.max_tokens:
            raise ValueError(f"{t} tokens, over max_tokens={self.max_tokens}")
        if distinct is not None and distinct < 0:
            raise ValueError(f"distinct must be >= 0, got {distinct}")
        if spread is not None and spread < 1:
            raise ValueError(f"spread must be >= 1, got {spread}")
        self.num_tokens = t
        self.distinct = distinct
        self.spread = spread
        if t == 0:
            self.num_active.zero_()
            self.seg_len.zero_()
            self.active_slots.fill_(-1)
            return
        bins = next_pow2(self.max_slots + 2)
        # A decode step's few tokens sort in one program as wide as the batch, not in a 1,024-wide one
        # (9.5 us a step on an H200 at 64 tokens).
        chunk = min(self.chunk, max(16, next_pow2(t)))
        _prepare_kernel[(cdiv(t, chunk),)](
            token_slots.contiguous(), self.sorted_tokens, self.sorted_slots, self.active_slots, self.seg_start,
            self.seg_len, self.num_active, t, MAX_SLOTS=self.max_slots, BINS=bins, CHUNK=chunk,
        )

    def slots_bound(self) -> int:
        """A host-side upper bound on how many slots this step holds: at most one per token, at most
        `distinct` when the caller said so."""
        bound = min(self.max_slots, self.num_tokens)
        if self.distinct is not None:
            bound = min(bound, self.distinct)
        return max(1, bound)

    def rows_per_slot(self) -> int:
        """Tokens per adapter if they were spread evenly over `slots_bound()` slots (a host int): what the
        launch configs size their row tiles by."""
        return -(-max(1, self.num_tokens) // self.slots_bound())


def prepare_reference(token_slots: torch.Tensor, max_slots: int) -> dict[str, torch.Tensor]:
    """What `prepare` computes, in plain torch (host syncs allowed): for tests."""
    s = token_slots.long()
    keys = torch.where((s < 0) | (s >= max_slots), max_slots, s)
    order = torch.sort(keys, stable=True).indices
    counts = torch.bincount(keys, minlength=max_slots + 1)[:max_slots]
    starts = torch.cumsum(counts, 0) - counts
    active = torch.nonzero(counts).flatten()
    pad = max_slots - active.numel()
    return {
        "sorted_tokens": order.int(),
        "sorted_slots": torch.where(keys[order] < max_slots, keys[order], -1).int(),
        "active_slots": torch.cat([active, active.new_full((pad,), -1)]).int(),
        "seg_start": torch.cat([starts[active], starts.new_zeros(pad)]).int(),
        "seg_len": torch.cat([counts[active], counts.new_zeros(pad)]).int(),
        "num_active": torch.tensor([active.numel()], dtype=torch.int32),
    }
