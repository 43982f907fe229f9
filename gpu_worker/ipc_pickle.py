"""Pickling between the worker and the engine process it spawned, both ways (commands out, Batches back), with the
unpickler limited to the classes they exchange.

The pipes are anonymous, made by the worker for the process it spawned; nothing else holds them. Still, pickle's
loads calls whatever a stream names, so `loads` resolves only the classes listed in ALLOWED (the commands, Batches,
outputs, sampling parameters and errors the two sides send) and built-in exception classes: a stream that names
anything else (a function, another module's class) is refused with UnpicklingError before anything runs. No
weights cross these pipes; adapter and model weights load from safetensors only.

    data = dumps(batch)          # the writer's side
    batch = loads(data)          # the reader's side: only the listed classes
"""

from __future__ import annotations

import builtins
import io
import pickle

# module -> the classes of it a command or a Batch may carry
ALLOWED: dict[str, frozenset[str]] = {
    "gpu_worker.engine_core": frozenset({"Add", "Abort", "Prefetch", "Evict", "Stop", "Batch", "EngineInfo",
                                         "EngineLoad", "AdapterResidency", "UnavailableError"}),
    "gpu_worker.engine.outputs": frozenset({"RequestOutput", "CompletionOutput", "Logprob"}),
    "gpu_worker.engine.lora_request": frozenset({"LoRARequest"}),
    "gpu_worker.engine.sampling_params": frozenset({"SamplingParams"}),
    "gpu_worker.engine.errors": frozenset({"EngineError", "InvalidRequestError", "AdapterError", "CapacityError"}),
}


def dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "builtins":  # the errors the engine's side makes portable (engine_core.portable)
            cls = getattr(builtins, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                return cls
        raise pickle.UnpicklingError(f"{module}.{name} is not a class the worker and its engine process exchange")


def loads(data) -> object:
    return _Unpickler(io.BytesIO(data)).load()
