"""The routing policy over hand-made snapshots: no gRPC, no workers, microseconds per case."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.policy import PolicyParams, Snapshot, Tier, WorkerView, bound, choose, choose_baseline, preference

P = PolicyParams(load_factor=1.25, spill_load=4, max_load=16, prefetch_fraction=0.5)


def snap(*workers: WorkerView) -> Snapshot:
    return Snapshot.of(workers)


def idle(n: int, **kw) -> list[WorkerView]:
    return [WorkerView(f"w{i}", max_loras=4, **kw) for i in range(n)]


def test_gpu_slot_beats_host_memory_beats_cold():
    ws = idle(3)
    ws[0] = WorkerView("w0", load=2, host=frozenset({"a"}), max_loras=4)
    ws[1] = WorkerView("w1", load=3, gpu=frozenset({"a"}), max_loras=4)
    assert choose(snap(*ws), "a", P) == choose(snap(*reversed(ws)), "a", P)
    d = choose(snap(*ws), "a", P)
    assert (d.worker_id, d.tier) == ("w1", Tier.GPU)
    ws[1] = WorkerView("w1", load=3, max_loras=4)
    d = choose(snap(*ws), "a", P)
    assert (d.worker_id, d.tier) == ("w0", Tier.HOST)


def test_requests_already_there_count_as_in_the_slot():
    ws = idle(3)
    ws[2] = WorkerView("w2", load=1, demand={"a": 1}, max_loras=4)
    d = choose(snap(*ws), "a", P)
    assert (d.worker_id, d.tier) == ("w2", Tier.GPU)


def test_a_cold_adapter_goes_to_the_first_worker_of_its_preference_order():
    ws = idle(5)
    for name in ("sql-lora", "chat-lora", "x", "y"):
        d = choose(snap(*ws), name, P)
        assert d.tier is Tier.COLD
        assert d.worker_id == preference(name, tuple(w.worker_id for w in ws))[0]


def test_cold_placement_spreads_adapters_over_workers():
    ws = idle(4)
    homes = [choose(snap(*ws), f"adapter-{i}", P).worker_id for i in range(400)]
    counts = [homes.count(f"w{i}") for i in range(4)]
    assert min(counts) > 60, counts  # ~100 each


def test_two_replicas_agree_whatever_order_they_list_workers_in():
    ws = [WorkerView(f"w{i}", load=i % 3, gpu=frozenset({"hot"}) if i == 2 else frozenset(), max_loras=4)
          for i in range(6)]
    for name in ("hot", "cold-1", "cold-2", None):
        decisions = {choose(Snapshot.of(order), name, P) for order in itertools.permutations(ws, 6)
                     if order[0].worker_id in ("w0", "w5")}
        assert len(decisions) == 1, (name, decisions)


def test_a_worker_leaving_moves_only_its_own_adapters():
    names = [f"adapter-{i}" for i in range(300)]
    before = {n: choose(snap(*idle(5)), n, P).worker_id for n in names}
    after = {n: choose(snap(*idle(4)), n, P).worker_id for n in names}  # w4 left
    moved = [n for n in names if before[n] != after[n]]
    assert moved and all(before[n] == "w4" for n in moved)


def test_bound_is_the_larger_of_spill_load_and_the_fair_share():
    assert bound(snap(*idle(4)), P) == 4  # spill_load
    busy = [WorkerView(f"w{i}", load=10) for i in range(4)]
    assert bound(snap(*busy), P) == 13  # ceil(1.25 * 41 / 4)
    assert bound(snap(*[WorkerView(f"w{i}", load=15) for i in range(4)]), P) == 16  # capped by max_load


def test_a_hot_adapter_spills_to_the_next_worker_of_its_order_and_then_uses_both():
    order = preference("hot", ("w0", "w1", "w2", "w3"))
    first, second = order[0], order[1]
    ws = {w: WorkerView(w, max_loras=4) for w in order}
    ws[first] = WorkerView(first, load=4, gpu=frozenset({"hot"}), demand={"hot": 4}, max_loras=4)  # at the bound
    d = choose(snap(*ws.values()), "hot", P)
    assert (d.worker_id, d.tier) == (second, Tier.SPILL)
    # once the second holds it too, the two share it: the less loaded one gets the next request
    ws[second] = WorkerView(second, load=1, gpu=frozenset({"hot"}), demand={"hot": 1}, max_loras=4)
    ws[first] = WorkerView(first, load=3, gpu=frozenset({"hot"}), demand={"hot": 3}, max_loras=4)
    d = choose(snap(*ws.values()), "hot", P)
    assert (d.worker_id, d.tier) == (second, Tier.GPU)


def test_a_worker_near_the_bound_gets_its_adapter_prefetched_on_the_spill_target():
    order = preference("hot", ("w0", "w1", "w2"))
    ws = {w: WorkerView(w, max_loras=4) for w in order}
    ws[order[0]] = WorkerView(order[0], load=1, gpu=frozenset({"hot"}), demand={"hot": 1}, max_loras=4)
    d = choose(snap(*ws.values()), "hot", P)  # 2 of a bound of 4 after this one: half way
    assert d.worker_id == order[0] and d.prefetch == (order[1],)
    ws[order[0]] = WorkerView(order[0], load=0, gpu=frozenset({"hot"}), max_loras=4)
    assert choose(snap(*ws.values()), "hot", P).prefetch == ()


def test_a_cold_adapter_avoids_a_worker_whose_slots_are_all_taken():
    order = preference("new", ("w0", "w1", "w2"))
    ws = {w: WorkerView(w, max_loras=2) for w in order}
    ws[order[0]] = WorkerView(order[0], load=2, demand={"a": 1, "b": 1}, max_loras=2)  # both slots busy
    d = choose(snap(*ws.values()), "new", P)
    assert (d.worker_id, d.tier) == (order[1], Tier.COLD)


def test_host_memory_wins_even_when_its_slots_are_busy():
    ws = [WorkerView("w0", load=2, host=frozenset({"a"}), demand={"b": 1, "c": 1}, max_loras=2),
          WorkerView("w1", max_loras=2)]
    assert choose(snap(*ws), "a", P).worker_id == "w0"


def test_base_model_requests_go_to_the_least_loaded_worker():
    ws = [WorkerView("w0", load=3), WorkerView("w1", load=1, kv_free=0.2), WorkerView("w2", load=1, kv_free=0.9)]
    d = choose(snap(*ws), None, P)
    assert (d.worker_id, d.tier) == ("w2", Tier.BASE)


def test_hard_cap_and_exclusions():
    full = [WorkerView(f"w{i}", load=16) for i in range(3)]
    assert choose(snap(*full), "a", P) is None
    assert choose(snap(*full), None, P) is None
    assert choose(snap(), "a", P) is None
    ws = idle(3)
    home = choose(snap(*ws), "a", P).worker_id
    retry = choose(snap(*ws), "a", P, exclude=frozenset({home}))
    assert retry.worker_id != home
    assert choose(snap(*ws), "a", P, exclude=frozenset({"w0", "w1", "w2"})) is None


@settings(max_examples=300, deadline=None)
@given(loads=st.lists(st.integers(0, 20), min_size=1, max_size=8),
       holders=st.lists(st.booleans(), min_size=8, max_size=8),
       adapter=st.sampled_from(["a", "b", None]))
def test_never_past_the_bound_nor_the_cap(loads, holders, adapter):
    ws = [WorkerView(f"w{i}", load=n, gpu=frozenset({"a"}) if holders[i] else frozenset(), max_loras=4)
          for i, n in enumerate(loads)]
    s = snap(*ws)
    d = choose(s, adapter, P)
    if all(n >= P.max_load for n in loads):
        assert d is None
        return
    chosen = next(w for w in ws if w.worker_id == d.worker_id)
    assert chosen.load < P.max_load
    if adapter is not None and any(w.load < bound(s, P) for w in ws):
        assert chosen.load < bound(s, P)
    assert choose(Snapshot.of(reversed(ws)), adapter, P) == d  # order-independent


def test_round_robin_takes_turns_whatever_the_workers_hold():
    ws = [WorkerView("w0", gpu=frozenset({"a"})), WorkerView("w1"), WorkerView("w2", load=16)]  # w2 at the cap
    picks = [choose_baseline("round-robin", snap(*ws), "a", turn, P) for turn in range(4)]
    assert [d.worker_id for d in picks] == ["w0", "w1", "w0", "w1"]
    # the tier names where the adapter is on the chosen worker, as choose() does: the metrics compare
    assert [d.tier for d in picks] == [Tier.GPU, Tier.SPILL, Tier.GPU, Tier.SPILL]
    assert choose_baseline("round-robin", snap(*ws), "b", 1, P).tier is Tier.COLD
    assert choose_baseline("round-robin", snap(*ws), None, 1, P).tier is Tier.BASE
    assert choose_baseline("round-robin", snap(*ws), "a", 0, P, exclude=frozenset({"w0"})).worker_id == "w1"
    assert choose_baseline("round-robin", snap(*ws), "a", 0, P, exclude=frozenset({"w0", "w1"})) is None


def test_least_loaded_ignores_residency():
    ws = [WorkerView("w0", load=3, gpu=frozenset({"a"})), WorkerView("w1", load=1, host=frozenset({"a"})),
          WorkerView("w2", load=1)]
    d = choose_baseline("least-loaded", snap(*ws), "a", 0, P)
    assert (d.worker_id, d.tier) == ("w1", Tier.HOST)
    assert choose_baseline("least-loaded", snap(*ws), "a", 0, P, exclude=frozenset({"w1"})).worker_id == "w2"
    with pytest.raises(ValueError, match="unknown baseline routing"):
        choose_baseline("affinity", snap(*ws), "a", 0, P)
