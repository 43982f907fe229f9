"""The graphed decode path's host side on the CPU: DecodeGraphs.run stages a step's tokens, positions, slot
mapping, block tables, context lengths and LoRA slots into the static buffers a captured graph reads, pads
the batch to its bucket, and picks the graph with or without LoRA. Here each "replay" runs the model eagerly
over those buffers (fused decode attention and the Triton LoRA kernels in Triton's interpreter), so wrong
staging shows as wrong tokens against transformers + PEFT."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.engine import LLM, decode_graphs
from gpu_worker.engine.decode_graphs import LORA_VARIANTS, DecodeGraphs

from .test_oracle import PROMPTS, _check


class EagerReplay:
    """Stands in for a captured CUDA graph: replay() runs the forward on the static buffers now."""

    def __init__(self, graphs: DecodeGraphs, key, logits: torch.Tensor):
        self.graphs, self.key, self.logits = graphs, key, logits

    def replay(self) -> None:
        self.logits.copy_(self.graphs._forward(*self.key))


def replay_eagerly(llm: LLM, max_batch: int) -> list[tuple[int, frozenset[str] | None]]:
    """Route the engine's decode steps through DecodeGraphs.run; returns the log of the graph keys (bucket, LoRA
    variant, stacked P, spread, rank stride) replayed."""
    engine = llm.engine
    runner = engine.runner
    graphs = DecodeGraphs(engine.model, engine.kv_caches, engine.args.block_size, max_batch, engine.max_model_len,
                          scratch_block=engine.blocks.num_blocks, lora=runner.lora)
    replayed = []
    vocab = engine.model_config.vocab_size
    for b in graphs.buckets:
        for key in graphs.keys(b):
            replay = EagerReplay(graphs, key, torch.empty(b, vocab))
            inner = replay.replay
            replay.replay = lambda inner=inner, key=key: (replayed.append(key), inner())[1]
            graphs.graphs[key] = (replay, replay.logits)
    runner.fused_decode, runner.graphs = True, graphs
    return replayed


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_graph_inputs_staged_for_mixed_and_base_batches(tiny_model_dir, tiny_adapters, async_scheduling):
    """async: each step's tokens come from the step before through the device (the patch rows)."""
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=64,
              lora_backend="triton", max_num_batched_tokens=64, async_scheduling=async_scheduling)
    replayed = replay_eagerly(llm, max_batch=4)
    # 3 requests (bucket 4: a padding row), base and adapters mixed; then base only (the graph without LoRA).
    _check(llm, tiny_model_dir, PROMPTS[:3], tiny_adapters, [None, "sql-lora", "chat-lora"])
    assert (4, LORA_VARIANTS[-1], 2, False, 16) in replayed  # chat-lora targets every projection; 2 slots stacked
    assert llm.engine.runner.graphs.last == replayed[-1]  # what benchmarks.worker replays to time the GPU alone
    replayed.clear()
    _check(llm, tiny_model_dir, PROMPTS[3:5], tiny_adapters, [None, None])
    assert replayed and set(replayed) == {(2, None, None, False, None)}
    assert llm.engine.blocks.num_free == 64


def test_lora_graph_variant_follows_the_targets_of_the_batch(tiny_model_dir, tiny_adapters):
    """A batch whose adapters target only q/k/v (sql-lora: q_proj + v_proj, PEFT's default) replays the graph that
    runs LoRA on the qkv projection alone; with an adapter on o_proj too (math-lora), qkv and o; results match
    transformers + PEFT either way (a variant that skipped a targeted projection would not)."""
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=64,
              lora_backend="triton", max_num_batched_tokens=64)
    replayed = replay_eagerly(llm, max_batch=4)
    _check(llm, tiny_model_dir, PROMPTS[:2], tiny_adapters, [None, "sql-lora"])
    assert {key[1] for key in replayed} == {frozenset({"qkv"})}
    replayed.clear()
    _check(llm, tiny_model_dir, PROMPTS[:3], tiny_adapters, ["sql-lora", "math-lora", None])
    assert {key[1] for key in replayed} == {frozenset({"qkv", "o"})}


def test_unstacked_batches_replay_the_spread_graph_when_no_adapter_holds_many(tiny_model_dir, tiny_adapters,
                                                                              monkeypatch):
    """Past the stacked batches, a batch none of whose adapters holds more than the backend's spread_rows sequences
    replays the graph captured for such batches (its step says so to the kernels); one with an adapter on more
    sequences replays the graph for any mix. Results match transformers + PEFT either way."""
    monkeypatch.setattr(decode_graphs, "STACKED_MAX_BATCH", 1)
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=64,
              lora_backend="triton", max_num_batched_tokens=64)
    replayed = replay_eagerly(llm, max_batch=4)
    every = LORA_VARIANTS[-1]
    assert llm.engine.runner.lora.spread_rows == 2
    _check(llm, tiny_model_dir, PROMPTS[:3], tiny_adapters, [None, "sql-lora", "chat-lora"])
    assert (4, every, None, True, 16) in replayed and (4, every, None, False, 16) not in replayed
    replayed.clear()
    _check(llm, tiny_model_dir, PROMPTS[:4], tiny_adapters, ["chat-lora", "chat-lora", "chat-lora", None])
    assert (4, every, None, False, 16) in replayed and (4, every, None, True, 16) not in replayed


def test_eager_steps_hand_the_kernels_aligned_positions(tiny_model_dir, tiny_adapters):
    """Steps that run eagerly (here: every step, on the CPU) take their ids and positions from one staged tensor;
    the positions start 16-byte aligned whatever the token count (Triton compiles a kernel per pointer alignment:
    odd counts compiled RoPE + cache a second time inside a served step), and tokens still match PEFT."""
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=64)
    seen, forward = [], llm.engine.model.forward

    def recording(input_ids, positions, *args, **kwargs):
        seen.append((input_ids.numel(), positions.data_ptr() % 16))
        return forward(input_ids, positions, *args, **kwargs)

    llm.engine.model.forward = recording
    _check(llm, tiny_model_dir, PROMPTS[:3], tiny_adapters, [None, "sql-lora", "chat-lora"])
    assert any(n % 2 for n, _ in seen), seen  # odd token counts came
    assert {align for _, align in seen} == {0}, seen
