"""On CUDA: the fused decode attention, the Triton LoRA kernels and CUDA-graph decode give the tokens the
eager torch path gives, and transformers + PEFT agree. Skipped without a GPU."""

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
    kw = dict(enable_lora=True, max_loras=4, max_lora_rank=16, num_kv_blocks=128, dtype="float32")
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
