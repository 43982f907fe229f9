"""Bad input through the public API of the whole stack (`python -m stack`, as `make run` starts it): every bad
request gets a clear status, the services keep serving, and nothing leaks (the worker's KV blocks, running and
waiting counts, and every adapter's active requests are back where they started). Then bounded fuzzing with
hypothesis: any request the wire can carry gets OK or a status a client can act on, never UNKNOWN/INTERNAL."""

from __future__ import annotations

import math
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.stack_process import running_stack

Code = grpc.StatusCode
ACTIONABLE = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION,
              Code.OUT_OF_RANGE, Code.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("bad-input") / "demo") as st_, \
            grpc.insecure_channel(st_.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield inference_pb2_grpc.InferenceServiceStub(ch)


def request(text="Hello", model="", **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(model=model, prompt=common_pb2.Prompt(text=text),
                                         sampling=common_pb2.SamplingParams(**sampling))


def status_of(stub, req: inference_pb2.GenerateRequest, timeout: float = 60) -> tuple[Code, str]:
    try:
        stub.Generate(req, timeout=timeout)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return Code.OK, ""


def assert_nothing_held(stub, timeout_s: float = 10.0) -> None:
    """Every worker back at rest: all KV blocks free, no request running or waiting, no adapter in use."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = stub.GetClusterStatus(inference_pb2.GetClusterStatusRequest(), timeout=10).workers
        held = [(w.worker_id, w.kv_blocks_total - w.kv_blocks_free, w.running_requests, w.waiting_requests,
                 [(a.ref.name, a.active_requests) for a in w.adapters if a.active_requests])
                for w in workers if (w.kv_blocks_free != w.kv_blocks_total or w.running_requests
                                     or w.waiting_requests or any(a.active_requests for a in w.adapters))]
        if workers and not held:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"resources still held after the bad requests: {held or 'no worker'}")
        time.sleep(0.2)


CASES = {
    "no prompt": (inference_pb2.GenerateRequest(), Code.INVALID_ARGUMENT, "prompt"),
    "empty prompt": (request(""), Code.INVALID_ARGUMENT, "empty"),
    "empty token ids": (inference_pb2.GenerateRequest(prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds())),
                        Code.INVALID_ARGUMENT, "empty"),
    "token id past the vocabulary": (inference_pb2.GenerateRequest(prompt=common_pb2.Prompt(
        token_ids=common_pb2.TokenIds(ids=[1, 2, 4_000_000_000]))), Code.INVALID_ARGUMENT, "token"),
    "prompt longer than the model": (request("word " * 5000), Code.INVALID_ARGUMENT, "tokens"),
    "max_tokens 0": (request(max_tokens=0), Code.INVALID_ARGUMENT, "max_tokens"),
    "max_tokens past the model": (request(max_tokens=4_000_000_000), Code.INVALID_ARGUMENT, "max_tokens"),
    "NaN temperature": (request(temperature=math.nan), Code.INVALID_ARGUMENT, "temperature"),
    "negative temperature": (request(temperature=-1.0), Code.INVALID_ARGUMENT, "temperature"),
    "infinite temperature": (request(temperature=math.inf), Code.INVALID_ARGUMENT, "temperature"),
    "top_p above 1": (request(top_p=1.5), Code.INVALID_ARGUMENT, "top_p"),
    "top_p 0": (request(top_p=0.0), Code.INVALID_ARGUMENT, "top_p"),
    "NaN top_p": (request(top_p=math.nan), Code.INVALID_ARGUMENT, "top_p"),
    "min_p above 1": (request(min_p=2.0), Code.INVALID_ARGUMENT, "min_p"),
    "negative repetition penalty": (request(repetition_penalty=-1.0), Code.INVALID_ARGUMENT, "repetition_penalty"),
    "too many logprobs": (request(logprobs=100_000), Code.INVALID_ARGUMENT, "logprobs"),
    "too many stop strings": (request(stop=[f"s{i}" for i in range(10_000)]), Code.INVALID_ARGUMENT, "stop"),
    "a huge stop string": (request(stop=["x" * 100_000]), Code.INVALID_ARGUMENT, "stop"),
    "unknown model": (request(model="no-such-lora"), Code.NOT_FOUND, "no-such-lora"),
    "a path as the model": (request(model="../../etc/passwd"), Code.INVALID_ARGUMENT, "name"),
    "a message over the size limit": (request("x" * (8 << 20)), Code.RESOURCE_EXHAUSTED, ""),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_request_gets_a_clear_status_and_leaks_nothing(stub, name):
    req, want, words = CASES[name]
    code, details = status_of(stub, req)
    assert code == want, (name, code, details)
    assert words.lower() in details.lower(), (name, details)
    assert_nothing_held(stub)
    assert status_of(stub, request(max_tokens=2))[0] == Code.OK  # still serving


def test_min_tokens_over_max_tokens_is_refused(stub):
    code, details = status_of(stub, request(max_tokens=2, min_tokens=5))
    assert code == Code.INVALID_ARGUMENT and "min_tokens" in details


def test_a_deadline_that_passes_mid_request_frees_what_the_request_held(stub):
    code, _ = status_of(stub, request("Once upon a time", max_tokens=4000, ignore_eos=True), timeout=0.3)
    assert code in (Code.DEADLINE_EXCEEDED, Code.INVALID_ARGUMENT)
    assert_nothing_held(stub)


_finite = st.floats(allow_nan=True, allow_infinity=True, width=32)
_sampling = st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(0, 2**32 - 1), "temperature": _finite, "top_p": _finite,
    "top_k": st.integers(0, 2**32 - 1),
    "min_p": _finite, "seed": st.integers(0, 2**64 - 1), "stop": st.lists(st.text(max_size=20), max_size=8),
    "stop_token_ids": st.lists(st.integers(0, 2**32 - 1), max_size=8), "ignore_eos": st.booleans(),
    "repetition_penalty": _finite, "presence_penalty": _finite, "frequency_penalty": _finite,
    "logprobs": st.integers(0, 2**32 - 1), "min_tokens": st.integers(0, 2**32 - 1)})
_prompt = st.one_of(st.text(max_size=200).map(lambda t: common_pb2.Prompt(text=t)),
                    st.lists(st.integers(0, 2**32 - 1), max_size=50).map(
                        lambda ids: common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids))))
_model = st.sampled_from(["", "demo-llama", "sql-lora", "math-lora", "no-such", "a/b/c", "..", "x" * 300, "\x00"])


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(prompt=_prompt, model=_model, sampling=_sampling)
def test_fuzzed_requests_get_ok_or_an_actionable_status(stub, prompt, model, sampling):
    # Keep generations short: the fuzzer is after the validation, not the throughput.
    sampling["max_tokens"] = min(sampling.get("max_tokens", 4), 8) if sampling.get("max_tokens") else 4
    sampling["min_tokens"] = min(sampling.get("min_tokens", 0), 8)
    req = inference_pb2.GenerateRequest(model=model, prompt=prompt, sampling=common_pb2.SamplingParams(**sampling))
    code, details = status_of(stub, req)
    assert code == Code.OK or code in ACTIONABLE, (code, details, req)


def test_after_the_fuzzing_nothing_is_held(stub):
    assert_nothing_held(stub)


def test_bounded_load_of_mixed_adapters_has_no_errors_and_leaves_nothing_held(stub):
    """8 clients x 12 requests, base and four adapters mixed (pre-loaded, resolved from disk and from the
    Hub cache), unary and streaming: every one OK, then the counters are back at rest."""
    from concurrent.futures import ThreadPoolExecutor

    models = ["", "sql-lora", "math-lora", "code-lora", "demo-org/chat-lora"]

    def client(c: int) -> list[str]:
        codes = []
        for i in range(12):
            model = models[(c + i) % len(models)]
            try:
                if i % 3 == 0:
                    req = inference_pb2.GenerateStreamRequest(
                        model=model, prompt=common_pb2.Prompt(text=f"client {c} request {i}"),
                        sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0.7, seed=c * 100 + i,
                                                           ignore_eos=True))
                    last = list(stub.GenerateStream(req, timeout=120))[-1]
                    codes.append("OK" if last.finish_reason else "NO_FINISH")
                else:
                    req = request(f"client {c} request {i}", model=model, max_tokens=6, ignore_eos=True)
                    reply = stub.Generate(req, timeout=120)
                    codes.append("OK" if reply.usage.completion_tokens == 6 else "SHORT")
            except grpc.RpcError as e:
                codes.append(e.code().name)
        return codes

    with ThreadPoolExecutor(8) as pool:
        codes = [c for cs in pool.map(client, range(8)) for c in cs]
    assert codes == ["OK"] * 96, {c: codes.count(c) for c in set(codes)}
    assert_nothing_held(stub)
