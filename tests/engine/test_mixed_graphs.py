"""Piecewise graphs for steps with prompt tokens (mixed_graphs.py) on the CPU: the runner stages a step's tokens,
positions, KV slots and LoRA slots into the static buffers, pads them to the bucket, and replays the pieces with
the step's attention between them. Here each piece's "replay" runs it eagerly over the static buffers (the fused
elementwise, paged prefill and Triton LoRA kernels in Triton's interpreter), so wrong staging, a wrong cut or a
padding row leaking into a real one shows as wrong tokens against transformers + PEFT."""

from __future__ import annotations

import pytest

from gpu_worker.engine import LLM
from gpu_worker.engine.decode_graphs import graph_variants
from gpu_worker.engine.mixed_graphs import MixedGraphs

from .test_oracle import PROMPTS, _check


class EagerPiece:
    """Stands in for a captured piece: replay() runs it now, over the static buffers."""

    def __init__(self, graphs: MixedGraphs, i: int, key, log: list):
        self.graphs, self.i, self.key, self.log = graphs, i, key, log

    def replay(self) -> None:
        if self.i == 0:
            self.log.append(self.key)
        self.graphs._piece(self.i, *self.key[:2])  # (the slots are at the key's rank stride: find() picked it)


def replay_pieces_eagerly(llm: LLM, max_tokens: int) -> list:
    """Route the engine's steps with prompt tokens (every step, on the CPU: no fused decode) through
    MixedGraphs.run; returns the log of the (bucket, LoRA variant, rank stride) keys replayed."""
    engine = llm.engine
    runner = engine.runner
    graphs = MixedGraphs(engine.model, engine.kv_caches, max_tokens, engine.blocks.num_blocks,
                         engine.args.block_size, runner.lora)
    log: list = []
    for b in graphs.buckets:
        for lora in graph_variants(runner.lora):
            for rank_class in runner.lora.buffers.classes if lora else [None]:
                key = (b, lora, rank_class)
                graphs.graphs[key] = [EagerPiece(graphs, i, key, log) for i in range(len(engine.model.layers) + 1)]
    runner.mixed_graphs = graphs
    return log


@pytest.mark.parametrize("fused,async_scheduling", [(False, False), (True, False), (False, True)],
                         ids=["torch-ops", "fused-ops", "torch-ops-async"])
def test_pieces_match_peft_for_prompts_and_decodes_mixed(tiny_model_dir, tiny_adapters, fused, async_scheduling):
    """Prompts of different lengths joining, base and adapter requests mixed (the LoRA graphs, their metadata
    computed inside piece 0), then base requests alone (the graphs without LoRA). async: each step's last tokens
    come from the step in flight, patched into the inputs on the device before they are staged (before any op of
    the pieces, so the torch ops cover it, in a fraction of the fused ones' time in Triton's interpreter)."""
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=64, block_size=8,
              lora_backend="triton", max_num_batched_tokens=48, fused_elementwise=fused,
              fused_prefill_attention=True, async_scheduling=async_scheduling)
    replayed = replay_pieces_eagerly(llm, max_tokens=48)
    assert llm.engine.runner.mixed_graphs.buckets == [32]
    _check(llm, tiny_model_dir, PROMPTS[:3], tiny_adapters, ["sql-lora", None, "chat-lora"])
    # chat-lora targets every projection: the variant with all four groups, padded to 32 rows.
    assert (32, frozenset({"qkv", "o", "gate_up", "down"}), 16) in replayed
    replayed.clear()
    _check(llm, tiny_model_dir, PROMPTS[3:5], tiny_adapters, [None, None])
    assert replayed and set(replayed) == {(32, None, None)}
    assert llm.engine.blocks.num_free == 64


def test_steps_past_the_largest_bucket_run_eagerly(tiny_model_dir, tiny_adapters):
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=64, block_size=8,
              lora_backend="triton", max_num_batched_tokens=128, fused_prefill_attention=True)
    replayed = replay_pieces_eagerly(llm, max_tokens=32)
    long = PROMPTS[0] * 3  # one prompt of more than 32 tokens: its first step runs eagerly, its decodes do not
    _check(llm, tiny_model_dir, [long], tiny_adapters, ["code-lora"])
    assert replayed and len(replayed) == 9  # the 9 decode steps (10 tokens: the first comes with the prompt)
