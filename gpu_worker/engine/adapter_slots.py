"""Which adapter sits in which device slot, and which adapters stay in host memory. No torch.

An adapter's key is (name, content_hash): a reloaded adapter is a different key, so it can never be
served from a slot or a host entry that holds the old version.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

Key = Hashable
V = TypeVar("V")


# The least P a stacked decode graph is captured for (then twice that, and so on). 1: batches of one adapter (or a
# few, in low slots) read one slot's A and B, not 8. H200, graph replay, against 8: 1 adapter batch 64 1,513 ->
# 1,448 us, batch 32 1,431 -> 1,372; 4 adapters 1,516 -> 1,486, 1,435 -> 1,405; 171 decode graphs captured
# against 90 (Llama-3.2-1B shape, 32 slots; scratch probe).
SMALLEST_PREFIX = 1


def stacked_prefixes(num_slots: int) -> list[int]:
    """The slot counts P stacked decode graphs are captured for: SMALLEST_PREFIX, twice that, ... and all slots (a
    stacked GEMM reads P slots' A whether a token uses them or not, so few adapters replay a small P)."""
    return sorted({min(num_slots, SMALLEST_PREFIX << k) for k in range(max(1, num_slots.bit_length()))}
                  | {num_slots})


class SlotTable:
    """`num_slots` device slots. A slot in use by a running request is pinned; an idle one is kept for
    reuse and evicted least recently used first when another adapter needs a slot. A new adapter takes the
    lowest free slot: decode graphs read the A of a prefix of the slots (`stacked_prefixes`), so a few
    adapters in low slots replay a small prefix. An adapter can also move to a lower slot while it runs
    (`begin_move`, `finish_move`: the scheduler's compaction), keeping its old slot until the copy is in; an idle
    adapter the move displaced can then take that old slot (`place_idle`)."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._slot_of: dict[Key, int] = {}
        self._refs: dict[Key, int] = {}
        self._idle: OrderedDict[Key, None] = OrderedDict()  # resident, refcount 0, LRU first
        self._free: list[int] = list(range(num_slots))  # a heap
        self._moving: dict[Key, int] = {}  # key -> the slot it is being copied into (reserved: neither free nor idle)
        self._prefixes = stacked_prefixes(num_slots)

    def prefix_for(self, n: int) -> int:
        """The least stacked prefix that holds n slots (the decode graph a batch whose top slot is n - 1 replays)."""
        return next(p for p in self._prefixes if p >= n)

    def slot_of(self, key: Key) -> int | None:
        return self._slot_of.get(key)

    def acquire(self, key: Key) -> tuple[int, bool] | None:
        """Pin `key` into a slot: (slot, needs_load), or None when every slot is pinned by other adapters."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._refs[key] += 1
            self._idle.pop(key, None)
            return slot, False
        if self._free:
            slot = heapq.heappop(self._free)
        elif self._idle:
            victim, _ = self._idle.popitem(last=False)
            slot = self._slot_of.pop(victim)
            del self._refs[victim]
        else:
            return None
        self._slot_of[key] = slot
        self._refs[key] = 1
        return slot, True

    def release(self, key: Key) -> None:
        """Unpin one use of `key`; at zero uses the adapter stays resident until its slot is needed."""
        refs = self._refs[key] - 1
        if refs < 0:
            raise RuntimeError(f"release of an adapter that holds no slot: {key}")
        self._refs[key] = refs
        if refs == 0:
            self._idle[key] = None

    def evict(self, key: Key) -> bool:
        """Drop an idle adapter from its slot. False when it is absent or still in use."""
        if key not in self._slot_of or self._refs[key] > 0:
            return False
        self._idle.pop(key)
        heapq.heappush(self._free, self._slot_of.pop(key))
        del self._refs[key]
        return True

    def in_use(self, key: Key) -> int:
        return self._refs.get(key, 0)

    def open_slot_below(self, bound: int, keep: frozenset[Key] = frozenset()) -> int | None:
        """The lowest slot under `bound` an adapter could move into: a free one, else an idle adapter's (which
        the move would evict) unless that adapter is in `keep`; None when there is none."""
        if self._free and self._free[0] < bound:
            return self._free[0]
        idle = [self._slot_of[k] for k in self._idle if self._slot_of[k] < bound and k not in keep]
        return min(idle) if idle else None

    def begin_move(self, key: Key, slot: int) -> Key | None:
        """Reserve `slot` (free, or an idle adapter's, which is evicted: returned) for `key`, which keeps its
        own slot and an extra pin until `finish_move`."""
        if key not in self._slot_of or key in self._moving:
            raise RuntimeError(f"cannot move {key}: not resident, or already moving")
        evicted = next((k for k in self._idle if self._slot_of[k] == slot), None)
        if evicted is not None:
            self._idle.pop(evicted)
            del self._slot_of[evicted], self._refs[evicted]
        elif slot in self._free:
            self._free.remove(slot)
            heapq.heapify(self._free)
        else:
            raise RuntimeError(f"slot {slot} is neither free nor idle")
        self._moving[key] = slot
        self._refs[key] += 1
        self._idle.pop(key, None)
        return evicted

    def moving(self, key: Key) -> int | None:
        """The slot `key` is being moved into, or None."""
        return self._moving.get(key)

    def finish_move(self, key: Key) -> int:
        """The copy is in: `key` now lives in its new slot; its old slot is free (returned)."""
        old = self._slot_of[key]
        self._slot_of[key] = self._moving.pop(key)
        heapq.heappush(self._free, old)
        self.release(key)
        return old

    def place_idle(self, key: Key, slot: int) -> None:
        """Make `key` resident, idle, in free `slot` (the scheduler re-homing an adapter a move displaced); the
        caller copies its weights in."""
        if key in self._slot_of or slot not in self._free:
            raise RuntimeError(f"cannot place {key} in slot {slot}: already resident, or the slot is not free")
        self._free.remove(slot)
        heapq.heapify(self._free)
        self._slot_of[key] = slot
        self._refs[key] = 0
        self._idle[key] = None

    def resident(self) -> dict[Key, int]:
        """Resident adapters and their slots."""
        return dict(self._slot_of)

    def occupied(self) -> dict[int, Key]:
        """Slots that hold an adapter's weights or are being copied into, and whose: resident adapters' slots and
        the slots moves are reserving."""
        held = {slot: key for key, slot in self._slot_of.items()}
        held.update({slot: key for key, slot in self._moving.items()})
        return held

    @property
    def num_free(self) -> int:
        """Slots that could take a new adapter now (empty or idle)."""
        return len(self._free) + len(self._idle)


class HostLRU(Generic[V]):
    """Up to `capacity` adapters' weights in host memory; the least recently used goes first.

    An entry pinned by unfinished requests is never evicted (the count may then exceed capacity for a
    while): a request admitted for one version of an adapter is always served from that version's bytes,
    never from a re-read of a directory that may have changed since.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[Key, V] = OrderedDict()
        self._pins: dict[Key, int] = {}

    def pin(self, key: Key) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Key) -> None:
        left = self._pins[key] - 1
        if left:
            self._pins[key] = left
        else:
            del self._pins[key]
            self._shrink()

    def pinned(self, key: Key) -> bool:
        return key in self._pins

    def get(self, key: Key) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Key, value: V) -> list[Key]:
        """Insert (or refresh) `key`; returns the keys evicted to make room, oldest first."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        return self._shrink(keep=key)

    def _shrink(self, keep: Key | None = None) -> list[Key]:
        evicted = []
        for old in list(self._entries):
            if len(self._entries) <= self.capacity:
                break
            if old not in self._pins and old != keep:
                del self._entries[old]
                evicted.append(old)
        return evicted

    def pop(self, key: Key) -> V | None:
        if key in self._pins:
            return None
        return self._entries.pop(key, None)

    def keys(self) -> list[Key]:
        """Resident keys, least recently used first."""
        return list(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
