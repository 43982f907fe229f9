"""Continuous batching: which sequences run in the next step, and how many tokens of each. No torch.

Every step mixes decode tokens of running sequences with prefill chunks of new ones, under a token budget
(max_num_batched_tokens) and a sequence cap (max_num_seqs). The scheduler is aware of adapter slots: a
waiting request whose adapter cannot get a slot (every slot pinned by running requests of other adapters)
stays waiting while requests behind it that can run go ahead; a slot in use is never taken away.
When KV blocks run out, the most recently admitted running sequence is preempted (its blocks freed, to be
recomputed later) so that older ones finish.

With `compact_slots` (the engine's stacked decode graphs, whose cost grows with the prefix of slots a batch
spans: SlotTable.prefix_for), a running adapter whose slot lies past the prefix its batch's adapters would
need is copied into a free slot inside it, or an idle adapter's that no waiting request is for, one at a time
and only while one of its requests may still generate MOVE_MIN_TOKENS_LEFT tokens. Its requests (those admitted
meanwhile too) keep running from the old slot; once the copy is in they switch to the new one, and the idle
adapter the move displaced, if any, is copied into the old slot (from host memory, on the loader's side stream):
a compaction never turns a later request for it into a cold load (H200, 8 adapters in 32 slots, 8 prompts of
2,048 tokens, 4 a step: evicted by moves, adapters were copied in again every round while their requests waited).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from .adapter_slots import SlotTable
from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus

# Compaction moves an adapter only while one of its requests may still generate this many tokens.
MOVE_MIN_TOKENS_LEFT = 16


@dataclass
class ScheduledChunk:
    seq: Sequence
    # Tokens [start, start + num_tokens) of the sequence run in this step.
    start: int
    num_tokens: int

    @property
    def completes(self) -> bool:
        """After this chunk every token of the sequence is in the cache, so the next token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # (slot, adapter_key) pairs whose weights must be copied into the slot before this step runs.
    adapter_loads: list[tuple[int, tuple[str, str]]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class AdapterLoader(Protocol):
    def start_load(self, slot: int, key: tuple[str, str]) -> bool:
        """Begin copying an adapter into a slot; True if it is usable at once."""

    def ready(self, key: tuple[str, str]) -> bool:
        """Whether a copy begun earlier has finished."""

    def in_host(self, key: tuple[str, str]) -> bool:
        """Whether the adapter's weights are in host memory, to copy into a slot without reading them again."""


class Scheduler:
    def __init__(self, blocks: BlockManager, slots: SlotTable | None, max_num_seqs: int, max_num_batched_tokens: int,
                 loader: AdapterLoader | None = None, max_model_len: int | None = None, compact_slots: bool = False):
        self.blocks = blocks
        self.slots = slots
        self.loader = loader
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.compact_slots = compact_slots and slots is not None and loader is not None
        self._move: tuple[str, str] | None = None  # the adapter being copied into a lower slot
        self._displaced: tuple[str, str] | None = None  # the idle adapter whose slot that move took

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self._finish_move()

        # Running sequences first, oldest first: one decode token each, or the next prefill chunk.
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted by an older sequence in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0 or seq.pending and self._at_length_limit(seq):
                continue  # (a sequence whose pending token is its last: nothing more to compute)
            if seq.num_computed_tokens + n > len(seq.block_table) * self.blocks.block_size:  # needs a block
                while not self.blocks.can_grow(seq.block_table, seq.num_computed_tokens + n):
                    victim = self.running[-1]
                    self._preempt(victim)
                    out.preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                self.blocks.grow(seq.block_table, seq.num_computed_tokens + n)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n

        # Then waiting ones, in arrival order, unless memory was short this step.
        if not out.preempted:
            self._admit(out, budget)
        self._start_move()
        return out

    def _start_move(self) -> None:
        """With compact_slots and no move under way: the running adapter in the highest slot, when that slot lies
        past the prefix the running adapters need, starts its copy into the lowest open slot inside it."""
        if not self.compact_slots or self._move is not None:
            return
        active = {seq.adapter_key for seq in self.running if seq.adapter_key is not None and seq.slot >= 0}
        if not active:
            return
        top = max(active, key=self.slots.slot_of)
        need = self.slots.prefix_for(len(active))
        if self.slots.slot_of(top) < need:
            return
        # (Cheapest check first: this runs every step while the top adapter sits past the prefix.)
        target = self.slots.open_slot_below(need)
        if target is None:
            return
        # A move pays off over the decode steps still to come; a batch's last tokens do not repay it (nor what it
        # displaces: at the end of a round of short requests, the last adapter would move into the slot of one
        # a request of the next round is about to ask for).
        if max(s.params.max_tokens - len(s.output_token_ids) - s.pending for s in self.running
               if s.adapter_key == top) < MOVE_MIN_TOKENS_LEFT:
            return
        # Not into the slot of an idle adapter a waiting request is for: it would have to be copied back first.
        wanted = frozenset(seq.adapter_key for seq in self.waiting if seq.adapter_key is not None)
        if wanted:
            target = self.slots.open_slot_below(need, keep=wanted)
            if target is None:
                return
        self._displaced = self.slots.begin_move(top, target)
        self._move = top
        if self.loader.start_load(target, top):
            self._finish_move()

    def _finish_move(self) -> None:
        """The move's copy is in: its sequences (running, or waiting with its slot) switch to the new slot, and the
        idle adapter it displaced (unless a request has brought it back meanwhile, or host memory dropped it)
        is copied into the old one."""
        key = self._move
        if key is None or not self.loader.ready(key):
            return
        old = self.slots.finish_move(key)
        new = self.slots.slot_of(key)
        for seq in (*self.running, *self.waiting):
            if seq.adapter_key == key and seq.slot == old:
                seq.slot = new
        self._move = None
        displaced, self._displaced = self._displaced, None
        if displaced is not None and self.slots.slot_of(displaced) is None and self.loader.in_host(displaced):
            self.slots.place_idle(displaced, old)
            self.loader.start_load(old, displaced)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                return
            # Cached blocks of the prompt's (and, after preemption, the outputs') prefix are taken, not computed.
            fresh = self.blocks.prefix_caching and not seq.block_table
            cached = self.blocks.match(seq.adapter_key, seq.token_ids(0, seq.num_tokens)) if fresh else []
            start = max(seq.num_computed_tokens, len(cached) * self.blocks.block_size)
            n = min(seq.num_tokens - start, budget)
            # A prompt admitted in chunks needs blocks for its first chunk now; first come, first served.
            new_blocks = self.blocks.blocks_needed(start + n) - len(seq.block_table) - len(cached)
            if new_blocks + self.blocks.extra_for(cached) > self.blocks.num_free:
                return
            if seq.adapter_key is not None:
                if seq.slot < 0:
                    got = self.slots.acquire(seq.adapter_key)
                    if got is None:
                        continue  # every slot pinned by other adapters: let requests behind it run
                    seq.slot, needs_load = got
                    if needs_load:
                        out.adapter_loads.append((seq.slot, seq.adapter_key))
                        if self.loader is not None and not self.loader.start_load(seq.slot, seq.adapter_key):
                            continue  # the copy is in flight: hold the slot, let others run meanwhile
                # Waits for its adapter's first copy; an adapter that is moving runs from its old slot meanwhile.
                if self.loader is not None and self.slots.moving(seq.adapter_key) is None \
                        and not self.loader.ready(seq.adapter_key):
                    continue
            if fresh:
                self.blocks.take_cached(seq.block_table, cached)
                seq.num_computed_tokens = start
                seq.prefix_known = len(cached)
                seq.prefix_parent = self.blocks.serial(cached[-1]) if cached else 0
                self.blocks.prefix_queried_tokens += seq.num_tokens
                self.blocks.prefix_hit_tokens += start
            self.blocks.grow(seq.block_table, start + n)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, start, n))
            budget -= n

    def _at_length_limit(self, seq: Sequence) -> bool:
        """Its tokens (pending ones counted) reach max_tokens or max_model_len: it stops on its next token."""
        return (len(seq.output_token_ids) + seq.pending >= seq.params.max_tokens
                or self.max_model_len is not None and seq.num_tokens >= self.max_model_len)

    def computed(self, seq: Sequence, num_computed: int) -> None:
        """The step was launched: `num_computed` of the sequence's tokens are (or will be, in stream order) in
        the cache; full blocks of tokens the host knows get cached (a pending token's block waits for its id)."""
        seq.num_computed_tokens = num_computed
        known = min(num_computed, seq.num_known_tokens)
        if self.blocks.prefix_caching and known // self.blocks.block_size > seq.prefix_known:
            seq.prefix_known, seq.prefix_parent = self.blocks.register(
                seq.block_table, seq.adapter_key, seq.token_ids(0, known), known, seq.prefix_known, seq.prefix_parent)

    def _preempt(self, seq: Sequence) -> None:
        """Free everything the sequence holds; it is recomputed from its prompt and outputs later."""
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.prefix_known = seq.prefix_parent = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        if seq.slot >= 0 and seq.adapter_key is not None:  # running, or waiting on its adapter's copy
            self.slots.release(seq.adapter_key)
        seq.slot = -1

    def finish(self, seq: Sequence) -> None:
        """Free a finished (or aborted) sequence's blocks and its hold on an adapter slot."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
