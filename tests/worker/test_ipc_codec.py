"""gpu_worker.ipc_codec: what the worker and its engine process send each other comes back whole, as the classes
it was made of (lists where the fields are lists, adapter keys as tuples), and nothing else can be sent or read
back: no pickle, no class a stream names that is not one of theirs."""

from __future__ import annotations

import msgpack
import pytest

from gpu_worker import ipc_codec
from gpu_worker.engine.errors import AdapterError, CapacityError, InvalidRequestError
from gpu_worker.engine.lora_request import LoRARequest
from gpu_worker.engine.outputs import CompletionOutput, Logprob, RequestOutput
from gpu_worker.engine.sampling_params import SamplingParams
from gpu_worker.engine_core import (
    Abort,
    AdapterResidency,
    Add,
    Batch,
    EngineInfo,
    EngineLoad,
    Evict,
    Prefetch,
    Stop,
    UnavailableError,
    from_wire,
)


def back(obj):
    return ipc_codec.decode(ipc_codec.encode(obj))


def test_commands_come_back_equal():
    params = SamplingParams(max_tokens=4, temperature=0.0, stop=["\n"], stop_token_ids=[2], logprobs=3, seed=7)
    lora = LoRARequest("sql", 1, "/a", base_model_name="base")
    # (a prompt's token ids come back as a tuple, which the engine takes as it takes a list)
    for cmd in (Add(3, "r", (1, 2, 3), params, lora, "h"), Add(4, "s", {"prompt": "hi", "prompt_token_ids": (5,)},
                                                              SamplingParams(), None, ""),
                Abort("r"), Prefetch(5, lora, ""), Evict(6, "sql", "h"), Stop()):
        got = back(cmd)
        assert type(got) is type(cmd) and got == cmd
    got = back(Add(3, "r", [1], params, lora, "h"))
    assert type(got.params.stop) is list and type(got.params.stop_token_ids) is list


def test_batches_come_back_whole():
    lp = Logprob(7, -0.5, [(7, -0.5), (9, -1.5)])
    out = RequestOutput("r", "p", [1, 2], [CompletionOutput(0, "x", [7], -0.5, [lp], "stop", "\n",
                                                            delta_logprobs=[Logprob(7, -0.5)])],
                        finished=True, lora_request=LoRARequest("sql", 1, "/a"), adapter_key=("sql", "h"))
    residency = AdapterResidency("sql", "h", "gpu_slot", 1, 16)
    info = EngineInfo("m", "cuda:0", 128, 64, 16, True, 4, 8, 64, "/tok")
    batch = Batch(load=EngineLoad(0, 1, 10, (residency,), 5, 3),
                  results=[(3, ("sql", "h"), None), (4, None, AdapterError("not_found", "no adapter x")),
                           (5, residency, None), (6, 1, None)],
                  outputs=[("r", " x", [7], [Logprob(7, -0.5)]), out],
                  failed=[("q", UnavailableError("gone")), ("z", ValueError("bad")), ("y", KeyError("k"))],
                  ready=info, stopped=True, died=CapacityError("full"))
    got = back(batch)
    assert type(got) is Batch and type(got.results) is list and type(got.outputs) is list
    assert got.load == batch.load and got.ready == info and got.stopped
    assert got.outputs[1] == out and type(got.outputs[1].outputs[0].token_ids) is list
    assert got.results[0] == (3, ("sql", "h"), None) and got.results[2][1] == residency and got.results[3][1] == 1
    hash(got.results[0][1])  # an adapter key indexes dicts
    error = got.results[1][2]
    assert type(error) is AdapterError and error.kind == "not_found" and str(error) == "no adapter x"
    assert [(rid, type(e), str(e)) for rid, e in got.failed] == [(rid, type(e), str(e)) for rid, e in batch.failed]
    assert type(got.died) is CapacityError and str(got.died) == "full"
    delta = from_wire(got.outputs[0], ("sql", "h"))
    assert delta.request_id == "r" and delta.adapter_key == ("sql", "h")
    assert delta.outputs[0].delta_token_ids == [7] and delta.outputs[0].delta_logprobs == [Logprob(7, -0.5)]
    assert type(back(Batch(ready=InvalidRequestError("bad model"))).ready) is InvalidRequestError


def test_errors_of_other_classes_cross_as_runtime_errors_naming_them():
    class Odd(Exception):
        """Not one of the classes that cross."""

    got = back(Batch(failed=[("r", Odd("strange"))]))
    assert type(got.failed[0][1]) is RuntimeError and str(got.failed[0][1]) == "Odd: strange"
    got = back(Batch(failed=[("r", ValueError(object()))]))  # args that are not plain values: the message
    assert type(got.failed[0][1]) is ValueError and "object" in str(got.failed[0][1])


def test_anything_else_is_refused_both_ways():
    from gpu_worker.engine_core import EngineCore  # ours, but not a message

    for obj in (EngineCore, eval, object(), Batch(outputs=[{1, 2}])):
        with pytest.raises(TypeError, match="not something the worker and its engine process exchange"):
            ipc_codec.encode(obj)
    assert back(Abort("r")) == Abort("r")  # a refused encoding leaves nothing behind for the next
    # Streams written by hand: a class that is not a message's, a message's with the wrong number of fields, an
    # error class that is not one, an extension that is not ours.
    cases = ((["EngineCore"], 1, "'EngineCore' with 0 fields"),
             (["Abort", "r", "x"], 1, "'Abort' with 2 fields"),
             (["system", ["true"], None], 2, "'system' is not an error"),
             (["print", ["x"], None], 2, "'print' is not an error"),
             (["x"], 9, "extension 9"),
             ([{"a": 1}], 1, "malformed extension 1"),
             (7, 2, "malformed extension 2"))
    for fields, code, match in cases:
        data = msgpack.packb(msgpack.ExtType(code, msgpack.packb(fields)))
        with pytest.raises(ValueError, match=match):
            ipc_codec.decode(data)


def test_sampling_params_are_checked_again_when_read():
    data = ipc_codec.encode(SamplingParams()).replace(b"\xcb?\xf0\x00\x00\x00\x00\x00\x00", b"\xcb\xbf\xf0" + 6 * b"\0")
    with pytest.raises(InvalidRequestError):  # a temperature of -1.0 written into the stream
        ipc_codec.decode(data)
