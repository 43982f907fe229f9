"""KV cache blocks: a free list and per-sequence block tables. No torch: the cache tensors live elsewhere."""

from __future__ import annotations


class BlockManager:
    """Hands out fixed-size KV blocks. A sequence of n tokens holds ceil(n / block_size) blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        # LIFO: a block freed a moment ago is likely still in cache.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether `block_table` can be extended to hold `num_tokens` tokens."""
        return self.blocks_needed(num_tokens) - len(block_table) <= len(self._free)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend `block_table` in place to hold `num_tokens` tokens. Call can_grow first."""
        extra = self.blocks_needed(num_tokens) - len(block_table)
        if extra > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {extra}, have {len(self._free)}")
        for _ in range(extra):
            block_table.append(self._free.pop())

    def free(self, block_table: list[int]) -> None:
        """Return every block of `block_table` and empty it."""
        self._free.extend(reversed(block_table))
        block_table.clear()
