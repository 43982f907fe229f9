"""On CUDA: the fused decode attention, the Triton LoRA kernels and CUDA-graph decode give the tokens the
eager torch path gives, and transformers + PEFT agree. Skipped without a GPU. The batches here are of at most 5
sequences: engines capture decode graphs up to max_num_seqs = 8 (at the default 256, capturing every bucket of
every variant; the four tests then took 259 s on an H200)."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.engine import LLM, LoRARequest, SamplingParams

from .oracle import greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["hello world, this is a longer prompt", "SELECT * FROM", "def foo(x):", "the quick brown fox", "a b"]
NAMES = [None, "sql-lora", "chat-lora", "code-lora", "math-lora"]


def generate(llm, adapters, names, n=12):
    loras = [None if x is None else LoRARequest(x, i + 1, str(adapters[x])) for i, x in enumerate(names)]
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1)
    return llm.generate(PROMPTS[: len(names)], params, lora_request=loras)


def test_graphs_and_kernels_match_eager_and_peft(tiny_model_dir, tiny_adapters):
    kw = dict(enable_lora=True, max_loras=4, max_lora_rank=16, num_kv_blocks=128, dtype="float32",
              max_num_seqs=8)
    eager = LLM(str(tiny_model_dir), enforce_eager=True, lora_backend="torch", fused_elementwise=False, **kw)
    # The GPU path in full: Triton LoRA kernels, CUDA graphs, fused elementwise kernels, the prefix cache (the
    # prompts come back below: their blocks are reused); the eager torch path (and transformers + PEFT) as
    # references.
    fast = LLM(str(tiny_model_dir), lora_backend="triton", enable_prefix_caching=True, **kw)
    assert fast.engine.runner.graphs is not None and fast.engine.runner.graphs.graphs
    assert fast.engine.runner.mixed_graphs is not None and fast.engine.runner.mixed_graphs.graphs
    assert fast.engine.model.ops.__name__ == "FusedOps" and eager.engine.model.ops.__name__ == "TorchOps"
    a = generate(eager, tiny_adapters, NAMES)
    b = generate(fast, tiny_adapters, NAMES)
    # The prompts' step replayed the graph pieces of the variant with every projection (chat-lora's targets).
    assert fast.engine.runner.mixed_graphs.last[1] == frozenset({"qkv", "o", "gate_up", "down"})
    for name, x, y in zip(NAMES, a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids, name
        ref, _ = greedy(tiny_model_dir, None if name is None else tiny_adapters[name], x.prompt_token_ids, 12)
        assert y.outputs[0].token_ids == ref, name
        for p, q in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert abs(p.logprob - q.logprob) < 2e-3
    # Base-only batches use their own graph (no LoRA op), and a batch of one too.
    for names in ([None, None, None], ["chat-lora"]):
        for x, y in zip(generate(eager, tiny_adapters, names), generate(fast, tiny_adapters, names)):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids
    assert fast.engine.blocks.num_free == 128
    assert fast.engine.stats()["prefix_cache_hit_tokens"] > 0


def test_cold_copies_issued_after_the_launch_give_the_same_tokens(tiny_model_dir, tiny_adapters):
    """The copies the scheduler starts go out once the step it scheduled is launched (manager.issue_loads), the
    image's upload at once and only its scatter into the slot after the steps in flight. With four adapters over
    two slots, adapters come in, are evicted and come back; the tokens match the eager path's, and no copy is left
    behind."""
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=128, dtype="float32",
              max_num_seqs=8)
    eager = LLM(str(tiny_model_dir), enforce_eager=True, lora_backend="torch", fused_elementwise=False, **kw)
    fast = LLM(str(tiny_model_dir), lora_backend="triton", **kw)
    for names in (NAMES, NAMES[::-1], ["math-lora", "sql-lora", None]):
        for x, y in zip(generate(eager, tiny_adapters, names), generate(fast, tiny_adapters, names), strict=True):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids
    assert fast.engine.lora.copies_in_flight == 0 and eager.engine.lora.copies_in_flight == 0


def test_spread_graphs_run_the_rows_expand_and_match_eager(tiny_model_dir, tiny_adapters, monkeypatch):
    """Past the stacked batches (lowered here to 2 rows), a batch whose adapters each hold few sequences replays the
    graph captured for such batches, whose expands run on the rows kernel (its size bound lowered to nothing, so the
    other graph's run on the segmented kernel); tokens match the eager torch path and logprobs agree; a batch with
    one adapter on three sequences replays the graph for any mix."""
    import kernels.lora_expand_rows as expand_rows
    from gpu_worker.engine import decode_graphs

    monkeypatch.setattr(decode_graphs, "STACKED_MAX_BATCH", 2)
    monkeypatch.setattr(expand_rows, "MAX_WORK", 0)
    kw = dict(enable_lora=True, max_loras=4, max_lora_rank=16, num_kv_blocks=128, dtype="float32", max_num_seqs=8)
    eager = LLM(str(tiny_model_dir), enforce_eager=True, lora_backend="torch", fused_elementwise=False, **kw)
    fast = LLM(str(tiny_model_dir), lora_backend="triton", **kw)
    graphs = fast.engine.runner.graphs
    every = frozenset({"qkv", "o", "gate_up", "down"})
    assert (8, every, None, True, 16) in graphs.graphs and (8, every, None, False, 16) in graphs.graphs
    replayed, run = [], graphs.run
    monkeypatch.setattr(graphs, "run", lambda key, *a: (replayed.append(key), run(key, *a))[1])
    # Every adapter on one sequence: the spread graphs alone; code-lora on three: the graphs for any mix (while the
    # three decode together: sequences whose prompts ran in later steps end later, in smaller batches).
    for names, spreads in ((NAMES, {True}), (["code-lora", "code-lora", "code-lora", None, "sql-lora"], {False})):
        replayed.clear()
        a = generate(eager, tiny_adapters, names)
        b = generate(fast, tiny_adapters, names)
        unstacked = {spread for _, variant, stacked, spread, _ in replayed if variant and stacked is None}
        assert spreads <= unstacked and (spreads == {False} or unstacked == {True}), replayed
        for x, y in zip(a, b):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids
            for p, q in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
                assert abs(p.logprob - q.logprob) < 2e-3


def test_rank_strides_follow_the_adapters_in_graphs(tiny_model_dir, tiny_adapters, rank32_adapter, monkeypatch):
    """max_lora_rank 64: batches of rank <= 16 adapters replay the decode graphs captured at stride 16; a rank-32
    adapter moves the slots to 64 and its batches replay those; tokens match the eager torch path and PEFT and
    logprobs agree at both. Cold images are uploaded after the last relayout, which shares their staging buffer,
    and before the wait for the steps in flight."""
    adapters = dict(tiny_adapters, **{"wide-lora": rank32_adapter})
    kw = dict(enable_lora=True, max_loras=3, max_lora_rank=64, num_kv_blocks=128, dtype="float32",
              max_num_seqs=8)
    eager = LLM(str(tiny_model_dir), enforce_eager=True, lora_backend="torch", fused_elementwise=False, **kw)
    fast = LLM(str(tiny_model_dir), lora_backend="triton", **kw)
    graphs = fast.engine.runner.graphs
    replayed, run = [], graphs.run
    monkeypatch.setattr(graphs, "run", lambda key, *a: (replayed.append(key), run(key, *a))[1])
    for names, stride in ((NAMES[:4], 16), (["wide-lora", "chat-lora", None, "code-lora"], 64),
                          (["math-lora", "sql-lora", "chat-lora"], 16)):
        if stride == 16 and "wide-lora" in {key[0] for key in fast.engine.lora.slots.resident()}:
            assert fast.engine.lora.evict("wide-lora") == 1  # unloaded: back to stride 16
        replayed.clear()
        a = generate(eager, adapters, names)
        b = generate(fast, adapters, names)
        assert {key[4] for key in replayed if key[1]} == {stride}, replayed
        assert fast.engine.lora.buffers.rank_class == stride
        for name, x, y in zip(names, a, b):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids, name
            ref, _ = greedy(tiny_model_dir, None if name is None else adapters[name], x.prompt_token_ids, 12)
            assert y.outputs[0].token_ids[: len(ref)] == ref and len(ref) >= 4, name  # (PEFT's stops at EOS)
            for p, q in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
                assert abs(p.logprob - q.logprob) < 2e-3
