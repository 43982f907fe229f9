"""`benchmarks.worker.cold_load`: the cold-load harness runs end to end on the CPU and accounts each step after a
cold request by its position (on the CPU a copy is done at once, so the copy is held in flight for two polls of
`ready` here, as a GPU's side-stream copy is while steps run)."""

from __future__ import annotations

import shutil

from benchmarks.worker import cold_line, cold_load
from gpu_worker.engine import EngineArgs, LLMEngine, LoRARequest


def test_cold_load_counts_the_steps_while_copies_are_in_flight(tiny_model_dir, tiny_adapters, tmp_path):
    engine = LLMEngine(EngineArgs(model=str(tiny_model_dir), dtype="float32", enable_lora=True, max_loras=4,
                                  max_lora_rank=16, max_cpu_loras=8, num_kv_blocks=256, max_num_seqs=8))
    warm = [LoRARequest(name, i + 1, str(tiny_adapters[name])) for i, name in enumerate(["chat-lora", "code-lora"])]
    colds = []
    for k in range(2):  # the same weights under new names: adapters never loaded before
        shutil.copytree(tiny_adapters["sql-lora"], tmp_path / f"cold{k}")
        colds.append(LoRARequest(f"cold{k}", 100 + k, str(tmp_path / f"cold{k}")))
    manager, polls = engine.lora, {}
    started = manager.start_load

    def start_load(slot, key):
        started(slot, key)
        polls[key] = 0
        return False  # in flight

    def ready(key):
        if key not in polls:
            return True
        polls[key] += 1
        return polls[key] > 2  # the third poll finds it done

    manager.start_load, manager.ready = start_load, ready
    cold = cold_load(engine, warm, colds, batch=4)
    # Three steps each: the one that starts the copy, two that find it in flight; the fourth finds it done.
    assert cold["loads"] == 2 and cold["during_steps"] == 6
    assert len(cold["by_position_ms"]) == len(cold["by_position_max_ms"]) == 3
    assert all(m <= x for m, x in zip(cold["by_position_ms"], cold["by_position_max_ms"], strict=True))
    assert cold["join_step_ms"] > 0 and not engine.has_unfinished_requests()
    line = cold_line(cold)
    assert "(2 loads, 6 steps)" in line and "by step after the request (median / max): " in line
    assert len(line.split("(median / max): ")[1].split(", ")) == 3
