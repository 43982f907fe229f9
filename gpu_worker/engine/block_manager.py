"""KV cache blocks: a free list, per-sequence block tables and, optionally, a prefix cache. No torch: the cache
tensors live elsewhere.

The prefix cache keeps full blocks whose K/V were computed, keyed by what determines them: the adapter
(name and content hash: a base-model block never serves an adapter, nor one adapter's another's, nor a
reloaded adapter's its previous version's), the block's tokens, and the block before it. A request whose
prompt starts with cached blocks takes them (shared, read-only: a sequence only ever writes into its last,
private block) and computes only the rest. Blocks nobody holds stay cached until a new block is needed, then
the least recently used goes. Keys chain through serial numbers that are never reused, so a key is exact
(no hash collisions) and evicting a block makes its descendants unreachable rather than wrong.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Sequence

Key = tuple[int, Hashable, tuple[int, ...]]  # (serial of the previous block or 0, adapter key, tokens)


class BlockManager:
    """Hands out fixed-size KV blocks. A sequence of n tokens holds ceil(n / block_size) blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        # LIFO: a block freed a moment ago is likely still in cache.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._cached: dict[Key, int] = {}  # key -> block
        self._key_of: dict[int, Key] = {}  # block -> key, while cached
        self._serial_of: dict[int, int] = {}  # block -> its serial, while cached
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recently used first
        self._serials = itertools.count(1)
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks a sequence can get: never used, or cached but held by nobody (evicted on demand)."""
        return len(self._free) + len(self._idle)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether `block_table` can be extended to hold `num_tokens` tokens."""
        return self.blocks_needed(num_tokens) - len(block_table) <= self.num_free

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend `block_table` in place to hold `num_tokens` tokens. Call can_grow first."""
        extra = self.blocks_needed(num_tokens) - len(block_table)
        if extra > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {extra}, have {self.num_free}")
        for _ in range(extra):
            block = self._free.pop() if self._free else self._evict()
            self._refs[block] = 1
            block_table.append(block)

    def free(self, block_table: list[int]) -> None:
        """Return every block of `block_table` and empty it (a cached block stays cached until needed)."""
        for block in reversed(block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)
        block_table.clear()

    # -- prefix cache ------------------------------------------------------------------------------

    def match(self, adapter: Hashable, tokens: Sequence[int]) -> list[int]:
        """Cached blocks holding the longest prefix of `tokens` under `adapter`, whole blocks only, never the
        block of the last token (its logits must be computed)."""
        if not self.prefix_caching:
            return []
        bs = self.block_size
        full = (len(tokens) - 1) // bs
        blocks: list[int] = []
        parent = 0
        for i in range(full):
            block = self._cached.get((parent, adapter, tuple(tokens[i * bs:(i + 1) * bs])))
            if block is None:
                break
            blocks.append(block)
            parent = self._serial_of[block]
        return blocks

    def serial(self, block: int) -> int:
        """A cached block's serial: what the key of the block after it chains on."""
        return self._serial_of[block]

    def extra_for(self, cached: list[int]) -> int:
        """How many free blocks taking `cached` uses up (those nobody holds leave the free pool)."""
        return sum(1 for b in cached if self._refs[b] == 0)

    def take_cached(self, block_table: list[int], cached: list[int]) -> None:
        """Start an empty `block_table` with the blocks `match` returned."""
        if block_table:
            raise ValueError("cached blocks start a block table")
        for block in cached:
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1
            block_table.append(block)

    def register(self, block_table: list[int], adapter: Hashable, tokens: Sequence[int], num_computed: int,
                 known: int, parent: int) -> tuple[int, int]:
        """Cache the blocks of `block_table` that are full and computed, from block `known` on (the blocks
        before it are cached already, the last of them with serial `parent`, 0 for none). Returns the new
        (known, parent) for the next call. A block whose key another block holds already stays private."""
        if not self.prefix_caching:
            return known, parent
        bs = self.block_size
        for i in range(known, num_computed // bs):
            key = (parent, adapter, tuple(tokens[i * bs:(i + 1) * bs]))
            block = block_table[i]
            other = self._cached.get(key)
            if other is None:
                self._cached[key] = block
                self._key_of[block] = key
                self._serial_of[block] = next(self._serials)
                other = block
            # (Same content computed twice, in another block: that one stays the cached copy, and this
            # sequence's next blocks chain on it, which holds the same prefix.)
            parent = self._serial_of[other]
            known = i + 1
        return known, parent

    def _evict(self) -> int:
        block, _ = self._idle.popitem(last=False)
        del self._cached[self._key_of.pop(block)]
        del self._serial_of[block]
        return block
