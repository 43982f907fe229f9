"""The prefix cache: full computed blocks reused by later requests with the same leading tokens and the same
adapter (name and content hash), never across adapters, never the block of a prompt's last token; blocks
shared read-only, kept while idle, evicted least recently used when new blocks are needed. End to end, the
engine with it gives transformers + PEFT's tokens and logprobs while computing less."""

from __future__ import annotations

import pytest

from gpu_worker.engine import LLM, SamplingParams
from gpu_worker.engine.block_manager import BlockManager

from .test_oracle import _check

BASE = None
SQL = ("sql-lora", "a" * 64)
SQL_RELOADED = ("sql-lora", "b" * 64)


def computed(bm: BlockManager, adapter, tokens: list[int]) -> list[int]:
    """A sequence admitted with whatever is cached, then run through all its tokens; returns its block table."""
    table: list[int] = []
    cached = bm.match(adapter, tokens)
    bm.take_cached(table, cached)
    bm.grow(table, len(tokens))
    known, parent = len(cached), bm.serial(cached[-1]) if cached else 0
    bm.register(table, adapter, tokens, len(tokens), known, parent)
    return table


def test_reuse_needs_the_same_tokens_and_the_same_adapter_version():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    prompt = list(range(10, 23))  # 13 tokens: 3 full blocks, the 4th holds the last token
    first = computed(bm, BASE, prompt)
    assert bm.match(BASE, prompt) == first[:3]
    assert bm.match(BASE, prompt[:12]) == first[:2]  # the block of the last token is never reused
    assert bm.match(BASE, prompt[:4] + [99] + prompt[5:]) == first[:1]  # diverges in block 2
    assert bm.match(SQL, prompt) == []  # the base model's K/V never serve an adapter
    sql = computed(bm, SQL, prompt)
    assert bm.match(SQL, prompt) == sql[:3] and not set(sql[:3]) & set(first)
    assert bm.match(SQL_RELOADED, prompt) == []  # a reloaded adapter never reuses its old version's


def test_shared_blocks_are_held_until_every_holder_frees_them_then_evicted_lru():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    a = computed(bm, BASE, [1, 2, 3, 4, 5])  # blocks: [1,2] [3,4] cached, [5] private
    b: list[int] = []
    hit = bm.match(BASE, [1, 2, 3, 4, 9])
    assert hit == a[:2] and bm.extra_for(hit) == 0  # held by a: taking them costs no free block
    bm.take_cached(b, hit)
    bm.free(a)
    assert bm.num_free == 6 - 2  # a's private block is free; the shared ones are still held by b
    bm.free(b)
    assert bm.num_free == 6 and bm.match(BASE, [1, 2, 3, 4, 5]) == hit  # idle, still cached
    assert bm.extra_for(hit) == 2
    # Allocating every block evicts the idle cached ones last: first the never-used, then least recent.
    c: list[int] = []
    bm.grow(c, 8)
    assert bm.match(BASE, [1, 2, 3, 4, 5]) == hit
    bm.grow(c, 10)
    assert bm.match(BASE, [1, 2, 3, 4, 5]) == hit[:1]  # the deeper block went first
    assert bm.num_free == 1
    bm.grow(c, 12)
    assert bm.match(BASE, [1, 2, 3, 4, 5]) == [] and bm.num_free == 0
    bm.free(c)
    assert bm.num_free == 6


def test_a_block_whose_parent_was_evicted_is_unreachable_even_if_its_block_id_returns():
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    first = computed(bm, BASE, [1, 2, 3, 4, 5])
    bm.free(first)  # idle: [1, 2] then [3, 4] cached
    table = computed(bm, BASE, [7, 8, 3, 4, 5])  # evicts both idle blocks; the same ids come back
    assert sorted(table) == [0, 1, 2]
    # [3, 4] is cached again, under [7, 8]: reachable from there, not from [1, 2] (whose serial is gone).
    assert bm.match(BASE, [7, 8, 3, 4, 5]) == table[:2]
    assert bm.match(BASE, [1, 2, 3, 4, 5]) == []


def test_off_by_default_nothing_is_cached():
    bm = BlockManager(num_blocks=4, block_size=2)
    table: list[int] = []
    bm.grow(table, 5)
    assert bm.register(table, BASE, [1, 2, 3, 4, 5], 5, 0, 0) == (0, 0)
    bm.free(table)
    assert bm.match(BASE, [1, 2, 3, 4, 5]) == [] and bm.num_free == 4


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_engine_reuses_a_shared_prefix_and_still_matches_peft(tiny_model_dir, tiny_adapters, async_scheduling):
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=64, block_size=8,
              enable_prefix_caching=True, async_scheduling=async_scheduling)
    stats = llm.engine.stats
    system = "You are a careful assistant. Answer briefly and exactly, in one line. Question: "
    _check(llm, tiny_model_dir, [system + "what is two plus two?"], tiny_adapters, [None])
    assert stats()["prefix_cache_hit_tokens"] == 0
    # Same system prompt, other questions: its full blocks come from the cache, results unchanged.
    _check(llm, tiny_model_dir, [system + "name a color.", system + "and a fruit?"], tiny_adapters, [None, None])
    hits = stats()["prefix_cache_hit_tokens"]
    assert hits >= 2 * 8 * 2, hits  # at least two blocks each
    # An adapter request with the same text computes everything (the base model's K/V differ from the adapter's).
    _check(llm, tiny_model_dir, [system + "name a color."], tiny_adapters, ["sql-lora"])
    assert stats()["prefix_cache_hit_tokens"] == hits
    # A conversation's next turn: the previous prompt, its answer, a new question. Blocks of generated tokens are
    # reused too, but only those whose K/V were computed (the last sampled token's never was).
    first = llm.generate([system + "count:"], SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True))[0]
    turn = first.prompt_token_ids + first.outputs[0].token_ids
    before = stats()["prefix_cache_hit_tokens"]
    _check(llm, tiny_model_dir, [{"prompt_token_ids": turn + turn[:5]}], tiny_adapters, [None])
    assert stats()["prefix_cache_hit_tokens"] - before >= (len(turn) - 1) // 8 * 8 - 8
    assert llm.engine.blocks.num_free == 64
