"""StreamGenerate over real gRPC: the streamed deltas add up to what the in-process LLM generates."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from gpu_worker.engine.lora.peft_adapter import content_hash
from loraserve.v1 import common_pb2, worker_pb2

from .conftest import generate_request

PROMPTS = ["Hello world", "SELECT * FROM users WHERE", "def foo(x):\n    return", "the quick brown fox", "a"]


def collect(stream) -> tuple[list, str, list[int]]:
    messages = list(stream)
    return messages, "".join(m.text_delta for m in messages), [t for m in messages for t in m.token_ids]


def check_against(messages, text, token_ids, ref) -> None:
    got = ref.outputs[0]
    assert token_ids == got.token_ids
    assert text == got.text
    last = messages[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert last.usage.completion_tokens == len(got.token_ids)
    assert all(m.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert not any(m.HasField("usage") for m in messages[:-1])


def test_base_request_streams_what_llm_generates(stub, reference):
    messages, text, token_ids = collect(stub.StreamGenerate(generate_request(PROMPTS[0], max_tokens=12)))
    check_against(messages, text, token_ids, reference([PROMPTS[0]], [None], 12)[0])
    assert len(messages) >= 2, "tokens should arrive as they are generated, not in one message"
    assert messages[0].worker_id == "test-worker"
    assert not messages[0].HasField("adapter")
    assert all(m.request_id == "t" for m in messages)


def test_adapter_request_streams_what_llm_generates(stub, reference, tiny_adapters):
    messages, text, token_ids = collect(stub.StreamGenerate(generate_request(PROMPTS[1], "sql-lora", max_tokens=10)))
    check_against(messages, text, token_ids, reference([PROMPTS[1]], ["sql-lora"], 10)[0])
    first = messages[0]
    assert first.adapter.name == "sql-lora"
    assert first.adapter.content_hash == content_hash(tiny_adapters["sql-lora"])
    assert first.worker_id == "test-worker"
    base = reference([PROMPTS[1]], [None], 10)[0]
    assert token_ids != base.outputs[0].token_ids, "the adapter should change the output"


def test_token_id_prompt_and_stop_token(stub, reference):
    ref = reference([PROMPTS[2]], [None], 8)[0]
    stop_id = ref.outputs[0].token_ids[3]
    req = worker_pb2.StreamGenerateRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ref.prompt_token_ids)),
        sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_id]),
    )
    messages, _, token_ids = collect(stub.StreamGenerate(req))
    end = ref.outputs[0].token_ids.index(stop_id) + 1
    assert token_ids == ref.outputs[0].token_ids[:end]
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert messages[-1].stop_reason == str(stop_id)


def test_logprobs_per_token(stub, reference):
    messages, _, token_ids = collect(stub.StreamGenerate(generate_request(PROMPTS[3], max_tokens=5, logprobs=3)))
    logprobs = [lp for m in messages for lp in m.logprobs]
    assert [lp.token_id for lp in logprobs] == token_ids == reference([PROMPTS[3]], [None], 5)[0].outputs[0].token_ids
    for lp in logprobs:
        assert len(lp.top) == 3 and lp.top[0].token_id == lp.token_id  # greedy: the sampled token is the top one
        assert lp.logprob <= 0 and all(isinstance(t.text, str) for t in lp.top)


def test_sixteen_concurrent_streams_with_mixed_adapters(stub, reference):
    names = [None, "sql-lora", "chat-lora", "code-lora", "math-lora"]
    cases = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)], 6 + i % 5) for i in range(16)]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: collect(stub.StreamGenerate(generate_request(c[0], c[1], max_tokens=c[2]))),
                                cases))
    for (prompt, name, max_tokens), (messages, text, token_ids) in zip(cases, results):
        ref = reference([prompt], [name], max_tokens)[0]
        check_against(messages, text, token_ids, ref)
        assert messages[0].adapter.name == (name or "")


def test_stream_interval_sends_at_least_that_many_tokens_a_message(aio_loop, tiny_model_dir, reference):
    """--stream-interval 4: the first message at once, then messages of at least 4 tokens (the last may hold fewer);
    the tokens and text are what they are token by token."""
    from .conftest import running_worker, stub_for, worker_config

    with running_worker(aio_loop, worker_config(tiny_model_dir, stream_interval=4)) as server, \
            stub_for(server.port) as interval_stub:
        messages, text, token_ids = collect(interval_stub.StreamGenerate(generate_request(PROMPTS[0], max_tokens=14)))
    check_against(messages, text, token_ids, reference([PROMPTS[0]], [None], 14)[0])
    sizes = [len(m.token_ids) for m in messages]
    assert sizes[0] >= 1 and all(n >= 4 for n in sizes[1:-1]) and len(messages) <= 1 + -(-13 // 4)
    assert messages[0].worker_id == "test-worker"
