"""Slot compaction end to end (CPU): a running adapter left in a high slot moves inside the prefix its batch
needs while its request decodes, another adapter then takes its old slot, and every request's tokens are what
they are without the move; so are those of a request admitted while the move's copy is still in flight."""

from __future__ import annotations

from gpu_worker.engine import EngineArgs, LLMEngine, LoRARequest, SamplingParams


class SlowCopies:
    """The engine's loader, but each copy (done at once on the CPU) reports ready only after `polls` polls, as a copy
    on the GPU's side stream does a step or two later: until then the moving adapter's old slot still holds it."""

    def __init__(self, loader, polls: int):
        self.loader, self.polls, self.left, self.started = loader, polls, {}, []

    def start_load(self, slot, key):
        self.started.append((slot, key[0]))
        self.loader.start_load(slot, key)
        self.left[key] = self.polls
        return False

    def ready(self, key):
        self.left[key] = self.left.get(key, 0) - 1
        return self.left[key] < 0

    def in_host(self, key):
        return self.loader.in_host(key)


def run(tiny_model_dir, tiny_adapters, compact: bool, slow_copies: bool = False):
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), enable_lora=True, max_loras=16,
                                                   max_cpu_loras=16, max_lora_rank=8, num_kv_blocks=256))
    engine.scheduler.compact_slots = compact
    if slow_copies:
        engine.scheduler.loader = SlowCopies(engine.lora, polls=4)
    for i in range(10):  # ten adapters in slots 0-9; all but n0 and n9 finish after two tokens (n0 and n9 have
        # enough left for a move to pay: scheduler.MOVE_MIN_TOKENS_LEFT)
        path = tiny_adapters["sql-lora" if i % 2 else "math-lora"]
        params = SamplingParams(max_tokens=30 if i in (0, 9) else 2, temperature=0.0, ignore_eos=True)
        engine.add_request(f"r{i}", f"hello world {i}", params, LoRARequest(f"n{i}", i + 1, str(path)))
    tokens, slots_seen, steps = {}, set(), 0
    while engine.has_unfinished_requests():
        steps += 1
        if steps == 6:  # n1-n8 are done: with compaction n9 has moved, and n10 is copied into its old slot
            params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
            engine.add_request("r10", "hello again", params, LoRARequest("n10", 11, str(tiny_adapters["math-lora"])))
            if slow_copies:  # n9's move is in flight: this one runs from its old slot, then switches
                longer = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
                engine.add_request("r9b", "while moving", longer, LoRARequest("n9", 10, str(tiny_adapters["sql-lora"])))
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        slots_seen |= {(key[0], slot) for key, slot in engine.lora.slots.resident().items()
                       if key[0] in ("n1", "n9", "n10")}
        slots_seen |= {("r9b", s.slot) for s in engine.scheduler.running if s.request_id == "r9b"}
    return tokens, slots_seen


def test_a_running_adapter_moves_down_and_its_tokens_do_not_change(tiny_model_dir, tiny_adapters):
    want, seen_still = run(tiny_model_dir, tiny_adapters, compact=False)
    got, seen_moved = run(tiny_model_dir, tiny_adapters, compact=True)
    assert seen_still == {("n1", 1), ("n9", 9), ("n10", 10)}
    # n9 moved into slot 1 (idle n1's) while decoding, and n1 was copied into the slot n9 left, 9 (still resident);
    # n10 was copied into slot 10 and then (the copy being synchronous on the CPU) straight on into slot 2, whose
    # idle n2 took slot 10. Had r9 read the wrong slot, or n1's copy landed under r9, the tokens would differ.
    assert seen_moved == {("n1", 1), ("n1", 9), ("n9", 9), ("n9", 1), ("n10", 2)}
    assert got == want and len(got["r9"]) == 30 and len(got["r10"]) == 20


def test_a_request_admitted_while_its_adapter_moves_runs_from_the_old_slot(tiny_model_dir, tiny_adapters):
    want, _ = run(tiny_model_dir, tiny_adapters, compact=False, slow_copies=True)
    got, seen = run(tiny_model_dir, tiny_adapters, compact=True, slow_copies=True)
    assert ("n9", 1) in seen and ("n1", 9) in seen  # n9 moved down, n1 back into its old slot
    assert ("r9b", 9) in seen and ("r9b", 1) in seen  # it ran from slot 9 during the move, then from slot 1
    assert got == want and len(got["r9b"]) == 24 and len(got["r9"]) == 30


def test_rounds_of_prompts_over_resident_adapters_never_load_one_again(tiny_model_dir, tiny_adapters):
    """8 adapters in 16 slots, rounds of 8 requests of different lengths (their prompts 4 a step): as a round's
    batch thins, compaction moves the longer-lived adapters down, into idle adapters' slots, but no request of a
    later round finds its adapter gone: the displaced ones are copied back in, into the movers' old slots."""
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), enable_lora=True, max_loras=16,
                                                   max_cpu_loras=16, max_lora_rank=8, num_kv_blocks=256,
                                                   max_num_batched_tokens=4 * 24))
    engine.scheduler.compact_slots = True
    loader = engine.scheduler.loader = SlowCopies(engine.lora, polls=2)
    schedule, cold_loads = engine.scheduler.schedule, []

    def recorded():
        out = schedule()
        cold_loads.extend(key[0] for _, key in out.adapter_loads)  # slots a request's adapter is copied into
        return out

    engine.scheduler.schedule = recorded
    paths = [tiny_adapters["sql-lora" if i % 2 else "math-lora"] for i in range(8)]
    params = [SamplingParams(max_tokens=2 + 4 * i, temperature=0.0, ignore_eos=True) for i in range(8)]
    rid = 0
    for _ in range(5):
        for i in range(8):
            rid += 1
            engine.add_request(f"r{rid}", list(range(3, 27)), params[i],
                               LoRARequest(f"n{i}", i + 1, str(paths[i])))
        while engine.has_unfinished_requests():
            engine.step()
    assert sorted(cold_loads) == [f"n{i}" for i in range(8)]  # the first round's, once each
    # Past the cold loads: n7 (the longest-lived) moved into idle n0's slot 0 as the first round thinned, and n0 went
    # back in, into slot 7; after that every adapter sits inside the prefix its batches need.
    assert loader.started[8:] == [(0, "n7"), (7, "n0")]
