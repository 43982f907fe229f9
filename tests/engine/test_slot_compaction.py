"""Slot compaction end to end (CPU): a running adapter left in a high slot moves inside the prefix its batch
needs while its request decodes, another adapter then takes its old slot, and every request's tokens are what
they are without the move."""

from __future__ import annotations

from gpu_worker.engine import EngineArgs, LLMEngine, LoRARequest, SamplingParams


def run(tiny_model_dir, tiny_adapters, compact: bool):
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), enable_lora=True, max_loras=16,
                                                   max_cpu_loras=16, max_lora_rank=8, num_kv_blocks=256))
    engine.scheduler.compact_slots = compact
    for i in range(10):  # ten adapters in slots 0-9; all but n0 and n9 finish after two tokens
        path = tiny_adapters["sql-lora" if i % 2 else "math-lora"]
        params = SamplingParams(max_tokens=14 if i in (0, 9) else 2, temperature=0.0, ignore_eos=True)
        engine.add_request(f"r{i}", f"hello world {i}", params, LoRARequest(f"n{i}", i + 1, str(path)))
    tokens, slots_seen, steps = {}, set(), 0
    while engine.has_unfinished_requests():
        steps += 1
        if steps == 6:  # n1-n8 are done: with compaction n9 has moved, and n10 is copied into its old slot
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            engine.add_request("r10", "hello again", params, LoRARequest("n10", 11, str(tiny_adapters["math-lora"])))
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        slots_seen |= {(key[0], slot) for key, slot in engine.lora.slots.resident().items() if key[0] in ("n9", "n10")}
    return tokens, slots_seen


def test_a_running_adapter_moves_down_and_its_tokens_do_not_change(tiny_model_dir, tiny_adapters):
    want, seen_still = run(tiny_model_dir, tiny_adapters, compact=False)
    got, seen_moved = run(tiny_model_dir, tiny_adapters, compact=True)
    assert seen_still == {("n9", 9), ("n10", 10)}
    # n9 moved into slot 1 (idle n1's) while decoding; n10 was copied into the slot n9 left, 9, and then (the copy
    # being synchronous on the CPU) straight on into slot 2: r9 reading slot 9 would have read n10's weights.
    assert seen_moved == {("n9", 9), ("n9", 1), ("n10", 2)}
    assert got == want and len(got["r9"]) == 14 and len(got["r10"]) == 6
