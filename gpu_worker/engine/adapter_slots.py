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


class SlotTable:
    """`num_slots` device slots. A slot in use by a running request is pinned; an idle one is kept for
    reuse and evicted least recently used first when another adapter needs a slot. A new adapter takes the
    lowest free slot: decode graphs read the A of a prefix of the slots (decode_graphs.stacked_prefixes), so
    a few adapters in low slots replay a small prefix."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._slot_of: dict[Key, int] = {}
        self._refs: dict[Key, int] = {}
        self._idle: OrderedDict[Key, None] = OrderedDict()  # resident, refcount 0, LRU first
        self._free: list[int] = list(range(num_slots))  # a heap

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

    def resident(self) -> dict[Key, int]:
        """Resident adapters and their slots."""
        return dict(self._slot_of)

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
