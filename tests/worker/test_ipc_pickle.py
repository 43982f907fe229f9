"""gpu_worker.ipc_pickle: what the worker and its engine process send each other comes back whole, and a stream
naming anything but their classes (or a built-in exception) is refused before it runs."""

from __future__ import annotations

import os
import pickle

import pytest

from gpu_worker import ipc_pickle
from gpu_worker.engine.errors import AdapterError
from gpu_worker.engine.lora_request import LoRARequest
from gpu_worker.engine.outputs import CompletionOutput, Logprob, RequestOutput
from gpu_worker.engine.sampling_params import SamplingParams
from gpu_worker.engine_core import AdapterResidency, Add, Batch, EngineLoad, Stop, UnavailableError


def test_commands_and_batches_come_back_whole():
    add = Add(3, "r", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0), LoRARequest("sql", 1, "/a"), "")
    out = RequestOutput("r", None, [1, 2], [CompletionOutput(0, "x", [7], delta_logprobs=[Logprob(7, -0.5)])],
                        finished=True, adapter_key=("sql", "h"))
    residency = AdapterResidency("sql", "h", "gpu_slot", 1, 16)
    batch = Batch(load=EngineLoad(0, 1, 10, (residency,)),
                  results=[(3, ("sql", "h"), None), (4, None, AdapterError("not_found", "no adapter x"))],
                  outputs=[("r", " x", [7], [Logprob(7, -0.5)], ("sql", "h")), out],
                  failed=[("q", UnavailableError("gone")), ("z", ValueError("bad"))])
    for msg in (add, Stop(), batch):
        back = ipc_pickle.loads(ipc_pickle.dumps(msg))
        assert type(back) is type(msg)
    back = ipc_pickle.loads(ipc_pickle.dumps(batch))
    assert back.outputs[0] == batch.outputs[0] and back.outputs[1] == out and back.load == batch.load
    assert isinstance(back.results[1][2], AdapterError) and str(back.results[1][2]) == str(batch.results[1][2])
    assert [type(e) for _, e in back.failed] == [UnavailableError, ValueError]
    assert ipc_pickle.loads(ipc_pickle.dumps(add)) == add


class _Runs:
    def __reduce__(self):
        return os.system, ("true",)


def test_a_stream_naming_anything_else_is_refused_before_it_runs():
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        ipc_pickle.loads(pickle.dumps(_Runs()))
    from gpu_worker.engine_core import EngineCore  # ours, but not a message
    with pytest.raises(pickle.UnpicklingError, match="EngineCore"):
        ipc_pickle.loads(pickle.dumps(EngineCore))
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        ipc_pickle.loads(pickle.dumps(eval))
