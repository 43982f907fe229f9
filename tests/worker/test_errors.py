"""Refusals: each error leaves as the status code the proto promises, with a message naming the problem,
and the worker keeps serving."""

from __future__ import annotations

import grpc
import pytest

from gpu_worker.engine.lora.peft_adapter import content_hash
from loraserve.v1 import common_pb2, worker_pb2
from tests.services import wait_until

from .conftest import generate_request, running_worker, stub_for, worker_config


def error_of(stream_or_call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stream_or_call) if not callable(stream_or_call) else stream_or_call()
    return info.value


@pytest.mark.parametrize(
    "sampling, field",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_p=2.0), "min_p"),
        (dict(max_tokens=4, min_tokens=5), "min_tokens"),
        (dict(logprobs=99), "logprobs"),
        (dict(seed=2**63), "seed"),
    ],
)
def test_bad_sampling_params_are_invalid_argument(stub, sampling, field):
    err = error_of(stub.StreamGenerate(generate_request("hi", **sampling)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()


def test_bad_prompts_are_invalid_argument(stub, worker):
    cases = [
        (worker_pb2.StreamGenerateRequest(), "prompt is required"),
        (generate_request("x" * (1024 * 1024 + 1)), "1 MiB"),
        (worker_pb2.StreamGenerateRequest(prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[1] * 600))),
         "max_model_len"),
        (worker_pb2.StreamGenerateRequest(prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[10**6]))),
         "vocabulary"),
    ]
    for req, words in cases:
        err = error_of(stub.StreamGenerate(req))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert words in err.details()


def test_message_over_4_mib_is_refused(stub):
    err = error_of(stub.StreamGenerate(generate_request("x" * (5 * 1024 * 1024))))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_adapter_is_not_found(stub):
    err = error_of(stub.StreamGenerate(generate_request("hi", "no-such-lora")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-lora" in err.details()


@pytest.mark.parametrize("name", ["../etc", "a/../../b", "/etc/passwd", "..", "org/x/y", "x" * 129, "sql lora"])
def test_names_that_are_paths_are_invalid_argument(stub, name):
    err = error_of(stub.StreamGenerate(generate_request("hi", name)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid adapter name" in err.details()


def test_version_mismatch_is_failed_precondition(stub, tiny_adapters):
    have = content_hash(tiny_adapters["chat-lora"])
    err = error_of(stub.StreamGenerate(generate_request("hi", "chat-lora", "0" * 64, max_tokens=2)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"version mismatch: requested {'0' * 64}, have {have}" in err.details()
    ok = list(stub.StreamGenerate(generate_request("hi", "chat-lora", have, max_tokens=2)))
    assert ok[0].adapter.content_hash == have
    err = error_of(stub.StreamGenerate(generate_request("hi", "chat-lora", "not-a-hash")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_rank_over_max_lora_rank_is_failed_precondition(aio_loop, tiny_model_dir, tiny_adapters):
    root = tiny_adapters["sql-lora"].parent  # adapters found as <lora_root>/<name> on first request
    with running_worker(aio_loop, worker_config(tiny_model_dir, max_lora_rank=8, lora_root=str(root))) as server, \
            stub_for(server.port) as stub:
        err = error_of(stub.StreamGenerate(generate_request("hi", "code-lora", max_tokens=2)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "max_lora_rank" in err.details() and "code-lora" in err.details()
        err = error_of(lambda: stub.PrefetchAdapter(worker_pb2.PrefetchAdapterRequest(
            adapter=common_pb2.AdapterRef(name="code-lora"))))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        # Still serving: the base model and a rank-4 adapter from the lora root.
        assert list(stub.StreamGenerate(generate_request("hi", max_tokens=2)))[-1].usage.completion_tokens == 2
        msgs = list(stub.StreamGenerate(generate_request("hi", "sql-lora", max_tokens=2)))
        assert msgs[0].adapter.content_hash == content_hash(tiny_adapters["sql-lora"])


def test_adapters_on_a_worker_without_lora_are_failed_precondition(aio_loop, tiny_model_dir):
    with running_worker(aio_loop, worker_config(tiny_model_dir, enable_lora=False)) as server, \
            stub_for(server.port) as stub:
        err = error_of(stub.StreamGenerate(generate_request("hi", "sql-lora")))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "without LoRA" in err.details()
        assert list(stub.StreamGenerate(generate_request("hi", max_tokens=2)))[-1].usage.completion_tokens == 2
        assert stub.EvictAdapter(worker_pb2.EvictAdapterRequest(name="sql-lora")).evicted == 0


def test_full_queue_is_resource_exhausted(aio_loop, tiny_model_dir):
    # One sequence at a time and one waiting: the third concurrent request is refused.
    config = worker_config(tiny_model_dir, max_num_seqs=1, max_queue=1)
    with running_worker(aio_loop, config) as server, stub_for(server.port) as stub:
        long = generate_request("hello", max_tokens=300, ignore_eos=True)
        first = stub.StreamGenerate(long)
        next(first)  # running
        second = stub.StreamGenerate(long)
        assert wait_until(lambda: stub.GetStatus(worker_pb2.GetStatusRequest()).status.waiting_requests == 1)
        err = error_of(stub.StreamGenerate(generate_request("hi", max_tokens=1)))
        first.cancel()
        second.cancel()
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in err.details()
