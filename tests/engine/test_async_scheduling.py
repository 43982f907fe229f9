"""Async scheduling (EngineArgs.async_scheduling, on with CUDA): each step is launched before the previous one's
tokens are handed out. The results must be those of the synchronous engine, request for request: the same
tokens, text, finish reasons and stop reasons, whatever way requests end (EOS, a stop token, a stop string,
max_tokens, max_model_len, an abort while their step is in flight), and nothing held afterwards. The oracle
tests (test_oracle, test_prefix_cache) run both ways against transformers + PEFT."""

from __future__ import annotations

import pytest

from gpu_worker.engine import EngineArgs, LLMEngine, LoRARequest, SamplingParams


def make(model_dir, async_scheduling: bool, **kw) -> LLMEngine:
    return LLMEngine(EngineArgs(model=str(model_dir), enable_lora=True, max_loras=2, max_lora_rank=16,
                                num_kv_blocks=64, block_size=8, async_scheduling=async_scheduling, seed=0, **kw))


def drain(engine, max_steps: int = 500) -> dict:
    """request id -> its outputs, step by step, until nothing is left (a request that stops progressing fails
    the test instead of hanging it)."""
    seen: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    assert not engine.has_unfinished_requests(), f"still unfinished after {max_steps} steps"
    return seen


def summary(outs) -> tuple:
    last = outs[-1].outputs[0]
    logprobs = [round(lp.logprob, 4) for lp in last.logprobs or []]
    return last.token_ids, last.text, last.finish_reason, last.stop_reason, logprobs


def requests(model_dir, adapters, engine) -> None:
    """Requests that end every way, on tokens the synchronous engine found (a probe run picks them)."""
    sql = LoRARequest("sql-lora", 1, str(adapters["sql-lora"]))
    chat = LoRARequest("chat-lora", 2, str(adapters["chat-lora"]))
    probe = make(model_dir, False)
    for rid, lora in (("p0", None), ("p1", sql)):
        probe.add_request(rid, "the quick brown fox", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                          lora)
    got = {k: v[-1].outputs[0] for k, v in drain(probe).items()}
    stop_token = got["p0"].token_ids[3]
    stop_text = got["p1"].text[len(got["p1"].text) // 2:][:3]
    assert stop_text.strip(), got["p1"].text
    lp = dict(logprobs=2, temperature=0.0)
    engine.add_request("length", "the quick brown fox", SamplingParams(max_tokens=7, ignore_eos=True, **lp))
    engine.add_request("stop-token", "the quick brown fox",
                       SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[stop_token], **lp))
    engine.add_request("stop-string", "the quick brown fox", SamplingParams(max_tokens=12, stop=[stop_text], **lp), sql)
    engine.add_request("eos", "the quick brown fox", SamplingParams(max_tokens=12, **lp), chat)
    engine.add_request("min-tokens", "hello", SamplingParams(max_tokens=9, min_tokens=5, stop_token_ids=[stop_token],
                                                             **lp))
    engine.add_request("one", "a b c", SamplingParams(max_tokens=1, **lp), sql)
    engine.add_request("seeded", "hello there", SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=7,
                                                               logprobs=1), chat)
    engine.add_request("model-len", list(range(5, 5 + 40)), SamplingParams(max_tokens=100, ignore_eos=True, **lp))


def test_results_equal_the_synchronous_engine(tiny_model_dir, tiny_adapters):
    runs = {}
    for mode in (False, True):
        engine = make(tiny_model_dir, mode, max_model_len=48)
        requests(tiny_model_dir, tiny_adapters, engine)
        runs[mode] = {rid: summary(outs) for rid, outs in drain(engine).items()}
        assert engine.blocks.num_free == 64 and engine.lora.slots.num_free == 2
        assert not engine.has_unfinished_requests() and not engine._seqs
    assert runs[True] == runs[False]
    reasons = {rid: r[2] for rid, r in runs[True].items()}
    assert reasons["length"] == reasons["one"] == reasons["model-len"] == "length"
    assert reasons["stop-token"] == reasons["stop-string"] == "stop"
    assert len(runs[True]["model-len"][0]) == 48 - 40  # max_model_len counts prompt + output
    assert len(runs[True]["min-tokens"][0]) >= 5


def test_outputs_come_one_step_later_and_an_abort_in_flight_drops_its_row(tiny_model_dir, tiny_adapters):
    engine = make(tiny_model_dir, True)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    engine.add_request("a", "hello world", params)
    engine.add_request("b", "hello world", params, LoRARequest("sql-lora", 1, str(tiny_adapters["sql-lora"])))
    assert engine.step() == [] and engine.step_in_flight() and engine.has_unfinished_requests()
    first = engine.step()  # launches the first decode, hands out the prompts' tokens
    assert sorted(o.request_id for o in first) == ["a", "b"]
    assert all(len(o.outputs[0].token_ids) == 1 for o in first)
    engine.step()
    # "b" is aborted while its next token is being computed: that row is dropped, "a" goes on to the end.
    aborted = engine.abort_request("b")
    assert aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    seen = drain(engine)
    assert set(seen) == {"a"} and len(seen["a"][-1].outputs[0].token_ids) == 5
    assert engine.blocks.num_free == 64 and engine.lora.slots.num_free == 2 and not engine.has_unfinished_requests()
    # Aborting every request leaves nothing unfinished, even with a step of theirs in flight.
    engine.add_request("c", "hello world", params)
    engine.step()
    engine.step()
    assert engine.step_in_flight()
    engine.abort_request("c")
    assert not engine.has_unfinished_requests() and engine.blocks.num_free == 64
    engine.add_request("d", "hello world", params)  # the dead step is handed out (and dropped) on the way
    assert len(drain(engine)["d"][-1].outputs[0].token_ids) == 5


def test_penalties_need_the_ids_so_their_steps_do_not_overlap(tiny_model_dir):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.5)
    runs = {}
    for mode in (False, True):
        engine = make(tiny_model_dir, mode)
        engine.add_request("plain", "hello", SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        engine.step()
        engine.add_request("penalized", "hello world hello", params)
        seen: dict[str, list] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                seen.setdefault(out.request_id, []).append(out)
            # While a penalized request lives every step hands out its own tokens.
            assert not engine.step_in_flight() or "penalized" not in engine._seqs
        runs[mode] = {rid: summary(outs) for rid, outs in seen.items()}
        assert engine._penalized == 0
    assert runs[True] == runs[False]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_failed_step_loses_no_token(tiny_model_dir, async_scheduling):
    """A launch that raises (as a CUDA error would) after the previous step's tokens were sampled but not
    handed out: those sequences step back one token, and the requests still end with the tokens of a run
    that never failed; nothing is held afterwards."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    clean = make(tiny_model_dir, async_scheduling)
    clean.add_request("a", "hello there", params)
    want = drain(clean)["a"][-1].outputs[0].token_ids

    engine = make(tiny_model_dir, async_scheduling)
    engine.add_request("a", "hello there", params)
    seen = engine.step() + engine.step()
    run = engine.runner.run

    def boom(*a, **k):
        raise RuntimeError("injected")

    engine.runner.run = boom
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    engine.runner.run = run
    assert not engine.step_in_flight() and engine._seqs["a"].pending == 0
    outs = seen + [o for outs in drain(engine).values() for o in outs]
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == want
    assert engine.blocks.num_free == 64 and not engine.has_unfinished_requests()
