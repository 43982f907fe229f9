"""Scheduler, block manager and slot table: pure Python, no torch, no model."""

from __future__ import annotations

from gpu_worker.engine.adapter_slots import HostLRU, SlotTable
from gpu_worker.engine.block_manager import BlockManager
from gpu_worker.engine.sampling_params import SamplingParams
from gpu_worker.engine.scheduler import Scheduler
from gpu_worker.engine.sequence import Sequence, SequenceStatus


def seq(rid, n_prompt, adapter=None, max_tokens=64):
    return Sequence(rid, list(range(n_prompt)), params=SamplingParams(max_tokens=max_tokens), adapter_key=adapter)


def run_step(sched: Scheduler):
    """Pretend the model ran: advance computed tokens and append one token to completed sequences."""
    out = sched.schedule()
    out.completed = [c.seq.request_id for c in out.chunks if c.completes]
    for c in out.chunks:
        c.seq.num_computed_tokens = c.start + c.num_tokens
        if c.seq.request_id in out.completed:
            c.seq.output_token_ids.append(7)
    return out


def test_blocks_grow_and_free():
    bm = BlockManager(4, 16)
    table: list[int] = []
    assert bm.can_grow(table, 64) and not bm.can_grow(table, 65)
    bm.grow(table, 17)
    assert len(table) == 2 and bm.num_free == 2
    bm.grow(table, 32)
    assert len(table) == 2
    bm.free(table)
    assert table == [] and bm.num_free == 4


def test_slot_table_pins_and_lru():
    slots = SlotTable(2)
    assert slots.acquire("a") == (0, True)
    assert slots.acquire("b") == (1, True)
    assert slots.acquire("c") is None  # both pinned
    assert slots.acquire("a") == (0, False)
    slots.release("a")
    slots.release("a")
    slots.release("b")
    # a went idle first, so it is evicted first.
    assert slots.acquire("c") == (0, True)
    assert slots.resident() == {"b": 1, "c": 0}
    assert not slots.evict("c")  # in use
    assert slots.evict("b") and slots.num_free == 1


def test_slot_table_hands_out_the_lowest_free_slot():
    """Decode graphs stack the A of a prefix of the slots: a new adapter takes the lowest free one."""
    slots = SlotTable(4)
    assert [slots.acquire(k)[0] for k in "abcd"] == [0, 1, 2, 3]
    for k in "bcd":
        slots.release(k)
    assert slots.evict("d") and slots.evict("b")  # slots 3, then 1 freed
    assert slots.acquire("e") == (1, True)
    assert slots.acquire("f") == (3, True)


def test_host_lru_eviction_order():
    lru = HostLRU(2)
    assert lru.put("a", 1) == []
    assert lru.put("b", 2) == []
    lru.get("a")
    assert lru.put("c", 3) == ["b"]
    assert lru.keys() == ["a", "c"]


def test_budget_chunks_prefill_and_mixes_decode():
    sched = Scheduler(BlockManager(64, 4), None, max_num_seqs=8, max_num_batched_tokens=10)
    long, short = seq("long", 25), seq("short", 3)
    sched.add(long)
    sched.add(short)
    out = run_step(sched)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("long", 0, 10)]
    out = run_step(sched)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("long", 10, 10)]
    out = run_step(sched)  # 5 prompt tokens left of long, then short fits in the remaining budget
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("long", 5), ("short", 3)]
    assert out.completed == ["long", "short"]
    out = run_step(sched)  # both decode now
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("long", 1), ("short", 1)]


def test_adapter_waits_for_a_slot_and_others_go_ahead():
    slots = SlotTable(1)
    sched = Scheduler(BlockManager(64, 4), slots, max_num_seqs=8, max_num_batched_tokens=100)
    a1, b1, base, a2 = seq("a1", 4, ("a", "h")), seq("b1", 4, ("b", "h")), seq("base", 4), seq("a2", 4, ("a", "h"))
    for s in (a1, b1, base, a2):
        sched.add(s)
    out = run_step(sched)
    assert [c.seq.request_id for c in out.chunks] == ["a1", "base", "a2"]
    assert out.adapter_loads == [(0, ("a", "h"))]
    assert b1.status is SequenceStatus.WAITING and slots.in_use(("a", "h")) == 2
    sched.finish(a1)
    sched.finish(a2)
    out = run_step(sched)
    assert "b1" in [c.seq.request_id for c in out.chunks]
    assert out.adapter_loads == [(0, ("b", "h"))]


def test_preemption_frees_the_newest_and_recomputes():
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, None, max_num_seqs=8, max_num_batched_tokens=100)
    old, new = seq("old", 4), seq("new", 4)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # two blocks used, one free; both now have 5 tokens
    out = run_step(sched)  # each needs a second block: only one left, so "new" is preempted
    assert [s.request_id for s in out.preempted] == ["new"]
    assert [c.seq.request_id for c in out.chunks] == ["old"]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    sched.finish(old)
    out = run_step(sched)  # "new" is recomputed: its prompt and its one output token
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("new", 0, 5)]


def test_finish_releases_everything():
    slots = SlotTable(2)
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, slots, max_num_seqs=8, max_num_batched_tokens=100)
    s1, s2 = seq("s1", 9, ("a", "h")), seq("s2", 3, ("a", "h"))
    sched.add(s1)
    sched.add(s2)
    run_step(sched)
    sched.finish(s1)
    sched.finish(s2)
    assert bm.num_free == 8 and slots.in_use(("a", "h")) == 0 and not sched.has_unfinished()


class SlowLoader:
    """Copies finish only when the test says so, as a copy on a side stream would."""

    def __init__(self):
        self.started, self.done = [], set()

    def start_load(self, slot, key):
        self.started.append((slot, key))
        return False

    def ready(self, key):
        return key in self.done

    def in_host(self, key):
        return True


def test_request_waits_for_its_adapter_copy_while_others_run():
    loader, slots = SlowLoader(), SlotTable(2)
    sched = Scheduler(BlockManager(64, 4), slots, max_num_seqs=8, max_num_batched_tokens=100, loader=loader)
    a, base = seq("a", 4, ("a", "h")), seq("base", 4)
    sched.add(a)
    sched.add(base)
    out = run_step(sched)
    assert [c.seq.request_id for c in out.chunks] == ["base"]  # base is not held up by the copy
    assert loader.started == [(0, ("a", "h"))] and slots.in_use(("a", "h")) == 1
    out = run_step(sched)
    assert [c.seq.request_id for c in out.chunks] == ["base"] and len(loader.started) == 1  # not re-copied
    loader.done.add(("a", "h"))
    out = run_step(sched)
    assert [c.seq.request_id for c in out.chunks] == ["base", "a"]
    # A request that is aborted while waiting for its copy gives its slot back.
    b = seq("b", 4, ("b", "h"))
    sched.add(b)
    run_step(sched)
    assert slots.in_use(("b", "h")) == 1
    sched.finish(b)
    assert slots.in_use(("b", "h")) == 0


def test_stacked_prefixes_and_the_prefix_a_count_of_slots_needs():
    from gpu_worker.engine.adapter_slots import stacked_prefixes

    assert stacked_prefixes(32) == [1, 2, 4, 8, 16, 32] and stacked_prefixes(12) == [1, 2, 4, 8, 12]
    assert stacked_prefixes(4) == [1, 2, 4]
    assert [SlotTable(32).prefix_for(n) for n in (1, 2, 3, 8, 9, 16, 17, 32)] == [1, 2, 4, 8, 16, 16, 32, 32]


def test_slot_table_moves_an_adapter_into_a_lower_slot():
    slots = SlotTable(4)
    a, b, c = ("a", "h"), ("b", "h"), ("c", "h")
    assert [slots.acquire(k)[0] for k in (a, b, c)] == [0, 1, 2]
    slots.release(a)  # a idle in slot 0; slot 3 free
    assert slots.open_slot_below(4) == 3 and slots.open_slot_below(3) == 0 and slots.open_slot_below(0) is None
    assert slots.open_slot_below(3, keep=frozenset({a})) is None  # a is wanted: its slot is not open
    assert slots.begin_move(c, 0) == a  # slot 0's idle adapter gives way
    assert slots.slot_of(a) is None and slots.slot_of(c) == 2 and slots.moving(c) == 0
    # The reserved slot is handed to no one; c stays pinned by the move even with no request left.
    assert slots.acquire(("d", "h")) == (3, True)
    slots.release(c)
    assert slots.in_use(c) == 1 and slots.acquire(("e", "h")) is None
    assert slots.finish_move(c) == 2
    assert slots.slot_of(c) == 0 and slots.in_use(c) == 0 and slots.moving(c) is None
    assert slots.acquire(("e", "h")) == (2, True)  # the old slot is free again
    slots.release(("e", "h"))
    slots.evict(("e", "h"))
    slots.place_idle(a, 2)  # the displaced adapter back in the old slot, idle: the first to go when one is needed
    assert slots.slot_of(a) == 2 and slots.in_use(a) == 0 and slots.num_free == 2
    try:
        slots.place_idle(("f", "h"), 1)
    except RuntimeError as e:
        assert "not free" in str(e)
    else:
        raise AssertionError("placed an adapter in an occupied slot")


class MoveLoader:
    """Every copy stays in flight until the test completes it (ready is per copy, as the engine's loader's is)."""

    def __init__(self):
        self.started, self.pending, self.dropped = [], set(), set()

    def start_load(self, slot, key):
        self.started.append((slot, key))
        self.pending.add(key)
        return False

    def ready(self, key):
        return key not in self.pending

    def in_host(self, key):
        return key not in self.dropped


def test_compaction_moves_a_running_adapter_inside_the_prefix_its_batch_needs():
    loader, slots = MoveLoader(), SlotTable(16)
    sched = Scheduler(BlockManager(256, 4), slots, max_num_seqs=32, max_num_batched_tokens=200, loader=loader,
                      compact_slots=True)
    keys = [(f"a{i}", "h") for i in range(10)]
    seqs = [seq(f"r{i}", 4, k) for i, k in enumerate(keys)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    loader.pending.clear()  # every first copy in
    run_step(sched)
    assert [s.slot for s in seqs] == list(range(10))  # 10 adapters: the prefix of 16 is needed, no move
    assert not [m for m in loader.started if m[0] < 10 and m[1] != keys[m[0]]]
    for s in seqs[1:9]:
        sched.finish(s)  # a1..a8 idle in slots 1-8; a0 (slot 0) and a9 (slot 9) still run
    run_step(sched)
    assert loader.started[-1] == (1, keys[9])  # into the lowest idle slot inside the prefix of 2 (two adapters run)
    assert slots.slot_of(keys[1]) is None and slots.moving(keys[9]) == 1
    late = seq("late", 4, keys[9])
    sched.add(late)
    out = run_step(sched)  # the copy is in flight: a9's running request keeps slot 9, a new one runs from it too
    assert seqs[9].slot == 9 and "late" in [c.seq.request_id for c in out.chunks] and late.slot == 9
    loader.pending.clear()
    out = run_step(sched)
    assert seqs[9].slot == 1 and late.slot == 1 and slots.slot_of(keys[9]) == 1
    assert {c.seq.request_id for c in out.chunks} >= {"r0", "r9", "late"}
    # a1, displaced from slot 1, is copied into the slot a9 left: still resident, idle, so no request for it waits
    # on a cold load later.
    assert loader.started[-1] == (9, keys[1]) and slots.slot_of(keys[1]) == 9 and slots.in_use(keys[1]) == 0
    assert slots.acquire(("new", "h")) == (10, True)  # 2-9 hold idle adapters
    slots.release(("new", "h"))
    loader.pending.clear()
    run_step(sched)
    assert len(loader.started) == 12  # nothing more to move: a0, a9 in slots 0 and 1


def three_adapters(max_num_seqs: int = 8, max_tokens: int = 64):
    """A scheduler with compaction over 4 slots, and a request for each of three adapters, in slots 0-2 (their
    copies started and in): (loader, slots, scheduler, keys, requests)."""
    loader, slots = MoveLoader(), SlotTable(4)
    sched = Scheduler(BlockManager(256, 4), slots, max_num_seqs=max_num_seqs, max_num_batched_tokens=100,
                      loader=loader, compact_slots=True)
    keys = [(f"a{i}", "h") for i in range(3)]
    seqs = [seq(f"r{i}", 4, k, max_tokens=max_tokens) for i, k in enumerate(keys)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    loader.pending.clear()
    return loader, slots, sched, keys, seqs


def test_a_displaced_adapter_is_not_brought_back_when_a_request_did_or_host_memory_dropped_it():
    for case in ("requested", "dropped"):
        loader, slots, sched, keys, seqs = three_adapters()
        sched.finish(seqs[0])
        sched.finish(seqs[1])  # a2 alone in slot 2 (the prefix for one adapter is 1): it moves into a0's slot
        run_step(sched)
        assert loader.started[-1] == (0, keys[2]) and slots.slot_of(keys[0]) is None
        if case == "requested":  # a request for a0 takes a free slot before the move is in
            again = seq("again", 4, keys[0])
            sched.add(again)
            run_step(sched)
            assert again.slot == 3 and loader.started[-1] == (3, keys[0])
        else:
            loader.dropped.add(keys[0])
        loader.pending.clear()
        run_step(sched)
        assert slots.slot_of(keys[2]) == 0 and slots.moving(keys[2]) is None  # the move is in
        assert (2, keys[0]) not in loader.started  # a0 was not copied into a2's old slot
        if case == "requested":
            assert slots.slot_of(keys[0]) == 3 and again.slot == 3
        else:
            assert slots.slot_of(keys[0]) is None and slots.acquire(("new", "h")) == (2, True)  # a2's old slot


def test_a_move_does_not_displace_an_adapter_a_waiting_request_is_for():
    loader, slots, sched, keys, seqs = three_adapters(max_num_seqs=3)
    sched.finish(seqs[0])
    sched.finish(seqs[1])
    sched.max_num_seqs = 1  # a request for a0 waits (a2's fills the batch): a0's slot 0 is not open to a2's move
    sched.add(seq("r0b", 4, keys[0]))
    run_step(sched)
    assert slots.slot_of(keys[0]) == 0 and slots.moving(keys[2]) is None and len(loader.started) == 3
    sched.max_num_seqs = 3  # r0b runs from slot 0 (no copy), a1's idle slot 1 is open: a2 moves there
    run_step(sched)
    assert loader.started[3:] == [(1, keys[2])] and slots.slot_of(keys[0]) == 0


def test_no_move_for_an_adapter_whose_requests_are_nearly_done():
    from gpu_worker.engine.scheduler import MOVE_MIN_TOKENS_LEFT

    for left, moves in ((MOVE_MIN_TOKENS_LEFT - 1, False), (MOVE_MIN_TOKENS_LEFT, True)):
        loader, slots, sched, keys, seqs = three_adapters(max_tokens=left + 1)
        run_step(sched)  # prefill: one token out, `left` to go
        sched.finish(seqs[0])
        sched.finish(seqs[1])
        run_step(sched)
        assert (loader.started[-1] == (0, keys[2])) is moves
