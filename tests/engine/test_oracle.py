"""Engine vs transformers + PEFT: greedy tokens equal, logprobs close, for base and adapter requests mixed
in one batch, prompts of different lengths, across Llama, Mistral and Qwen2."""

from __future__ import annotations

import pytest
import torch

from demo.adapters import build_default_adapters
from demo.model import build_mistral, build_qwen2
from gpu_worker.engine import LLM, LoRARequest, SamplingParams

from .oracle import greedy

PROMPTS = [
    "hello world, this is a longer prompt with several words in it",
    "SELECT * FROM",
    "def foo(x):\n    return",
    "the quick brown fox jumps over",
    "a",
    "numbers 1 2 3 4 5 6 7 8 9 10 11 12",
]
NEW_TOKENS = 10
TOP = 5


def _check(llm, model_dir, prompts, adapters, names):
    loras = [None if n is None else LoRARequest(n, i + 1, str(adapters[n])) for i, n in enumerate(names)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=TOP, ignore_eos=True)
    outs = llm.generate(prompts, params, lora_request=loras)
    for name, out in zip(names, outs):
        got = out.outputs[0]
        adapter = None if name is None else adapters[name]
        ref_tokens, ref_lp = greedy(model_dir, adapter, out.prompt_token_ids, NEW_TOKENS)
        assert got.token_ids == ref_tokens, f"{name}: {got.token_ids} != {ref_tokens}"
        for step, lp in enumerate(got.logprobs):
            ref_top = torch.topk(ref_lp[step], TOP)
            assert [t for t, _ in lp.top] == ref_top.indices.tolist(), f"{name} step {step}: top tokens differ"
            ours = torch.tensor([v for _, v in lp.top])
            assert torch.allclose(ours, ref_top.values, atol=2e-4, rtol=1e-4), f"{name} step {step}"
            assert abs(lp.logprob - ref_lp[step][lp.token_id].item()) < 2e-4


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_mixed_batch_matches_peft(tiny_model_dir, tiny_adapters, async_scheduling):
    names = [None, "sql-lora", "chat-lora", "code-lora", "math-lora", None]
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=4, max_lora_rank=16, num_kv_blocks=128,
              async_scheduling=async_scheduling)
    assert llm.engine.model.ops.__name__ == "TorchOps"  # fused elementwise kernels are on with CUDA only
    _check(llm, tiny_model_dir, PROMPTS, tiny_adapters, names)
    # Base requests alone, adapter requests alone: same results as mixed.
    _check(llm, tiny_model_dir, PROMPTS[:2], tiny_adapters, [None, None])
    assert llm.engine.blocks.num_free == 128


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_one_slot_three_adapters_queued(tiny_model_dir, tiny_adapters, async_scheduling):
    """max_loras=1: requests of three adapters (and the base) take turns in the one slot; all correct (async:
    the slot changes hands while the step after its last user's is in flight)."""
    names = ["sql-lora", "chat-lora", None, "code-lora", "sql-lora"]
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=16,
              num_kv_blocks=128, async_scheduling=async_scheduling)
    _check(llm, tiny_model_dir, PROMPTS[: len(names)], tiny_adapters, names)
    assert llm.engine.lora.slots.in_use(next(iter(llm.engine.lora.slots.resident()))) == 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_chunked_prefill_and_preemption_keep_results(tiny_model_dir, tiny_adapters, async_scheduling):
    """A token budget smaller than the prompts (chunked prefill) and a KV cache so small that sequences are
    preempted and recomputed (async: some while their last token is still being sampled): the tokens do not
    change."""
    names = ["chat-lora", None, "sql-lora", "math-lora"]
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8,
              num_kv_blocks=7, max_num_batched_tokens=8, async_scheduling=async_scheduling)
    _check(llm, tiny_model_dir, [PROMPTS[0], PROMPTS[5], PROMPTS[2], PROMPTS[3]], tiny_adapters, names)
    assert llm.engine.blocks.num_free == 7


@pytest.mark.parametrize("builder", [build_qwen2, build_mistral], ids=["qwen2", "mistral"])
def test_other_architectures(builder, tmp_path_factory):
    root = tmp_path_factory.mktemp(builder.__name__)
    model_dir = builder(root / "model")
    adapters = build_default_adapters(model_dir, root / "adapters")
    llm = LLM(str(model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=64)
    _check(llm, model_dir, PROMPTS[:3], adapters, [None, "chat-lora", "sql-lora"])


def test_fused_elementwise_kernels_match_peft(tiny_model_dir, tiny_adapters):
    """fused_elementwise: the layers' RMSNorm + residual, RoPE + cache write and SiLU-and-multiply as Triton
    kernels (on the CPU, Triton's interpreter): still transformers + PEFT's tokens and logprobs, base and
    adapter requests mixed, and a prompt chunked over steps (cache writes at several offsets)."""
    names = [None, "sql-lora", "chat-lora", None]
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=64,
              block_size=8, max_num_batched_tokens=16, fused_elementwise=True)
    assert llm.engine.model.ops.__name__ == "FusedOps"
    _check(llm, tiny_model_dir, PROMPTS[:4], tiny_adapters, names)
    assert llm.engine.blocks.num_free == 64


def _force_lora_mode(monkeypatch, stacked: bool, p: int = 2) -> list[tuple[str, bool]]:
    """Every step of the Triton LoRA backend hands the adapters' part on (overlap) and, with stacked, as a pending
    expand for the stacked groups (p slots stacked: every group, gate_up included): what decode graphs do, forced on
    every step. Returns the log of (group, whether the projection handed on what the mode asks for), one entry for
    each projection that ran LoRA."""
    from kernels.consumer_expand import PendingExpand
    from kernels.engine_backend import TritonLoRA

    prepare, project, log = TritonLoRA.prepare, TritonLoRA.project, []
    monkeypatch.setattr(TritonLoRA, "prepare", lambda self, slots, distinct=None, overlap=False, groups=None,
                        stacked_slots=None, spread=None: prepare(self, slots, distinct, overlap=True, groups=groups,
                                                                 stacked_slots=p if stacked else None, spread=spread))

    def logged(self, layer, group, *args):
        out, delta = project(self, layer, group, *args)
        if self._runs(group):  # a projection no adapter of the step targets runs no LoRA: no delta
            log.append((group, isinstance(delta, PendingExpand) if stacked and group in self._stacked_groups
                        else type(delta) is tuple))
        return out, delta

    monkeypatch.setattr(TritonLoRA, "project", logged)
    return log


def test_eager_steps_expand_gate_up_in_silu_mul_and_match_peft(tiny_model_dir, tiny_adapters, monkeypatch):
    """Eager steps with the fused ops: gate_up's shrink runs and silu_mul expands its y in row tiles (a first step
    of more rows than one tile, prompts of three adapters and none in it), the other projections add in place;
    still transformers + PEFT's tokens and logprobs."""
    from kernels.consumer_expand import PendingExpand
    from kernels.elementwise import EXPAND_MAX_ROWS
    from kernels.engine_backend import TritonLoRA

    project, log = TritonLoRA.project, []

    def logged(self, layer, group, x, *args):
        out, delta = project(self, layer, group, x, *args)
        if self._runs(group):
            log.append((group, x.shape[0], isinstance(delta, PendingExpand)))
        return out, delta

    monkeypatch.setattr(TritonLoRA, "project", logged)
    names = ["sql-lora", None, "chat-lora", "math-lora"]
    prompts = [" ".join(PROMPTS * 3), PROMPTS[1], PROMPTS[3] * 4, PROMPTS[5] * 3]
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=4, max_lora_rank=16, num_kv_blocks=128,
              block_size=8, lora_backend="triton", fused_elementwise=True)
    _check(llm, tiny_model_dir, prompts, tiny_adapters, names)
    assert {(group, pending) for group, _, pending in log} == {("qkv", False), ("o", False), ("gate_up", True),
                                                              ("down", False)}
    assert max(rows for _, rows, _ in log) > EXPAND_MAX_ROWS
    assert llm.engine.blocks.num_free == 128


@pytest.mark.parametrize("stacked", [False, True], ids=["delta", "stacked"])
@pytest.mark.parametrize("fused", [False, True], ids=["torch-ops", "fused-ops"])
def test_lora_as_a_delta_matches_peft(tiny_model_dir, tiny_adapters, monkeypatch, fused, stacked):
    """The Triton LoRA backend handing each projection's adapter part back as a delta, added by the next elementwise
    op (what decode graphs on CUDA do, beside the base GEMM; forced here on every step, kernels in Triton's
    interpreter): still transformers + PEFT's tokens and logprobs, base and adapter requests mixed, with both the
    torch and the fused elementwise ops adding the deltas. stacked: the part left unexpanded by GEMMs over the base
    weights with the slots' A under them, the next op expanding it (what decode graphs of up to 64 rows do for the
    STACKED_GROUPS; the others as deltas)."""
    log = _force_lora_mode(monkeypatch, stacked)
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=64,
              block_size=8, max_num_batched_tokens=16, lora_backend="triton", fused_elementwise=fused)
    _check(llm, tiny_model_dir, PROMPTS[:3], tiny_adapters, ["sql-lora", None, "chat-lora"])
    assert log and all(ok for _, ok in log)
    assert {group for group, _ in log} == {"qkv", "o", "gate_up", "down"}  # chat-lora targets every projection


def test_one_slot_stacked_matches_peft(tiny_model_dir, tiny_adapters, monkeypatch):
    """Decode graphs of one adapter stack one slot (P = 1, adapter_slots.SMALLEST_PREFIX): every projection's GEMM
    with the one slot's A under it and the ops after it expanding, forced on every step, fused ops: still
    transformers + PEFT's tokens and logprobs beside a base request."""
    log = _force_lora_mode(monkeypatch, stacked=True, p=1)
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=64,
              block_size=8, max_num_batched_tokens=16, lora_backend="triton", fused_elementwise=True)
    _check(llm, tiny_model_dir, PROMPTS[:2], tiny_adapters, [None, "chat-lora"])
    assert {group for group, ok in log if ok} == {"qkv", "o", "gate_up", "down"} and all(ok for _, ok in log)


def test_stacked_projections_with_a_qkv_bias_match_peft(monkeypatch, tmp_path_factory):
    """Qwen2's q / k / v biases through the stacked GEMMs (the bias zero-padded over the slots' rows), fused ops,
    base and adapter requests mixed: transformers + PEFT's tokens and logprobs."""
    root = tmp_path_factory.mktemp("qwen2-stacked")
    model_dir = build_qwen2(root / "model")
    adapters = build_default_adapters(model_dir, root / "adapters")
    log = _force_lora_mode(monkeypatch, stacked=True)
    llm = LLM(str(model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=64, block_size=8,
              max_num_batched_tokens=16, lora_backend="triton", fused_elementwise=True)
    _check(llm, model_dir, PROMPTS[:3], adapters, ["chat-lora", None, "sql-lora"])
    assert log and all(ok for _, ok in log)


def test_paged_prefill_kernel_matches_peft(tiny_model_dir, tiny_adapters, monkeypatch):
    """fused_prefill_attention: chunks with a cached prefix (later chunks of prompts split by a small token
    budget, and prefix-cache hits), short first chunks and the decode rows of mixed steps attend through the paged
    prefill kernel (Triton's interpreter here), one launch for all of them: still transformers + PEFT's tokens and
    logprobs."""
    from kernels import paged_prefill

    launches, plans = [], []
    plan = paged_prefill.prefill_launch

    def counted(*args, **kwargs):
        chunks = len(args[1])  # q_rows
        plans.append(chunks)
        launch = plan(*args, **kwargs)

        def run(*a, **k):
            launches.append(chunks)  # chunks in the launch
            return launch(*a, **k)
        return run

    monkeypatch.setattr(paged_prefill, "prefill_launch", counted)
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, block_size=8, num_kv_blocks=64,
              max_num_batched_tokens=16, enable_prefix_caching=True, fused_prefill_attention=True)
    assert llm.engine.runner.fused_prefill
    # The start-up warm-up (CUDA engines run it) sends a first chunk, one with a cached prefix and a decode row
    # through the kernel, in the scratch block (block 64 here), and leaves nothing behind that changes the results
    # below.
    import gpu_worker.engine.sampler as sampler

    picked = []
    greedy = sampler._argmax
    monkeypatch.setattr(sampler, "_argmax", lambda logits: picked.append(tuple(logits.shape)) or greedy(logits))
    llm.engine.runner.warm_prompt_path(scratch_block=64)
    layers = llm.engine.model_config.num_layers
    assert plans == [3] and launches == [3] * layers  # planned once for the step, one launch a layer
    assert picked == [(3, llm.engine.model_config.vocab_size)]  # and the greedy pick over its logits (CUDA: compiled)
    monkeypatch.setattr(sampler, "_argmax", greedy)
    launches.clear()
    # Prompts longer than the budget: their later chunks have a cached prefix; adapter and base mixed.
    _check(llm, tiny_model_dir, [PROMPTS[0], PROMPTS[5]], tiny_adapters, ["chat-lora", None])
    assert launches
    # The same prompts again, and one that shares the first: prefix-cache hits, several chunks in one launch.
    launches.clear()
    _check(llm, tiny_model_dir, [PROMPTS[5], PROMPTS[0], PROMPTS[5] + " 13 14"], tiny_adapters,
           [None, "chat-lora", None])
    assert max(launches) >= 2, launches
    assert llm.engine.stats()["prefix_cache_hit_tokens"] > 0
    assert llm.engine.blocks.num_free == 64
