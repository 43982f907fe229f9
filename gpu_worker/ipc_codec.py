"""What the worker and the engine process it spawned send each other (commands out, Batches back), as MessagePack:
no pickle on either side.

MessagePack carries the plain values (None, bool, int, float, str, bytes, lists, tuples, dicts with string keys)
itself. The dataclasses in CLASSES travel as an extension of their own: the class's name, then its fields in order,
rebuilt through the class's constructor (SamplingParams checks itself again there). Errors travel as another: the
class's name and its arguments, rebuilt only as one of ERRORS or a built-in exception class. Anything else is
refused when it is encoded (TypeError), and a stream naming any other class is refused when it is read
(ValueError): nothing a stream holds can name code to run.

Arrays are read back as tuples (hashable: adapter keys index dicts); a dataclass field annotated as a list gets a
list back. A Batch's streamed outputs (outputs.DeltaOutput, plain tuples) need no extension at all.

    data = encode(batch)          # the writer's side
    batch = decode(data)          # the reader's side
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import threading
import types
import typing
from typing import NamedTuple

import msgpack

from gpu_worker import engine_core as core
from gpu_worker.engine.errors import AdapterError, CapacityError, EngineError, InvalidRequestError
from gpu_worker.engine.lora_request import LoRARequest
from gpu_worker.engine.outputs import CompletionOutput, Logprob, RequestOutput
from gpu_worker.engine.sampling_params import SamplingParams

CLASSES = (core.Add, core.Abort, core.Prefetch, core.Evict, core.Stop, core.Batch, core.EngineInfo, core.EngineLoad,
           core.AdapterResidency, RequestOutput, CompletionOutput, Logprob, LoRARequest, SamplingParams)
ERRORS = (EngineError, InvalidRequestError, AdapterError, CapacityError, core.UnavailableError)

_DATACLASS, _ERROR = 1, 2


class _Spec(NamedTuple):
    cls: type
    fields: tuple[str, ...]
    lists: tuple[int, ...]  # the fields annotated as lists (read back as tuples, then made lists)


def _is_list(annotation) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return annotation is list or typing.get_origin(annotation) is list


def _spec(cls: type) -> _Spec:
    hints = typing.get_type_hints(cls)
    fields = tuple(f.name for f in dataclasses.fields(cls))
    return _Spec(cls, fields, tuple(i for i, name in enumerate(fields) if _is_list(hints[name])))


_BY_CLASS = {cls: _spec(cls) for cls in CLASSES}
_BY_NAME = {cls.__name__: spec for cls, spec in _BY_CLASS.items()}
_ERRORS = {cls.__name__: cls for cls in ERRORS}


def _default(obj):
    spec = _BY_CLASS.get(type(obj))
    if spec is not None:
        return msgpack.ExtType(_DATACLASS, _pack_inner([spec.cls.__name__, *[getattr(obj, f) for f in spec.fields]]))
    if isinstance(obj, BaseException):
        return msgpack.ExtType(_ERROR, _pack_inner(_error_fields(obj)))
    raise TypeError(f"{type(obj).__module__}.{type(obj).__qualname__} is not something the worker and its engine "
                    "process exchange")


def _error_fields(error: BaseException) -> list:
    """[class name, args, AdapterError's kind]: args as they are where they are plain values, else the message."""
    name = type(error).__name__
    known = _ERRORS.get(name) is type(error) or getattr(builtins, name, None) is type(error)
    if not known:  # (engine_core.portable makes the engine side's errors one of these first)
        return ["RuntimeError", [f"{name}: {error}"], None]
    args = list(error.args) if all(isinstance(a, (str, int, float, bool, type(None))) for a in error.args) \
        else [str(error)]
    return [name, args, getattr(error, "kind", None) if isinstance(error, AdapterError) else None]


def _error(name: str, args: tuple, kind: str | None) -> BaseException:
    cls = _ERRORS.get(name)
    if cls is None:
        cls = getattr(builtins, name, None)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise ValueError(f"{name!r} is not an error the worker and its engine process exchange")
    try:
        return cls(kind, *args) if cls is AdapterError else cls(*args)
    except Exception:  # a built-in class whose constructor wants other arguments
        return RuntimeError(f"{name}: {', '.join(map(str, args))}")


def _ext(code: int, data: bytes):
    fields = _unpack(data)
    if code not in (_DATACLASS, _ERROR):
        raise ValueError(f"unknown MessagePack extension {code}")
    if not (isinstance(fields, tuple) and fields and isinstance(fields[0], str)):
        raise ValueError(f"a malformed extension {code}: {fields!r:.80}")
    if code == _ERROR:
        name, args, kind = fields
        return _error(name, args, kind)
    spec = _BY_NAME.get(fields[0])
    if spec is None or len(fields) != len(spec.fields) + 1:
        raise ValueError(f"{fields[0]!r} with {len(fields) - 1} fields is not a class the worker and its engine "
                         "process exchange")
    values = list(fields[1:])
    for i in spec.lists:
        if values[i] is not None:
            values[i] = list(values[i])
    return spec.cls(*values)


class _Packers(threading.local):
    """A Packer per depth of extensions nested in one another (a Packer is not re-entrant; a new one per object
    costs more than packing a small one), per thread."""

    def __init__(self):
        self.free: list[msgpack.Packer] = []


_packers = _Packers()


def _pack_inner(obj) -> bytes:
    free = _packers.free
    packer = free.pop() if free else msgpack.Packer(default=_default, use_bin_type=True)
    try:
        return packer.pack(obj)
    finally:
        free.append(packer)


_unpack = functools.partial(msgpack.unpackb, ext_hook=_ext, raw=False, use_list=False)


def encode(obj) -> bytes:
    return _pack_inner(obj)


def decode(data) -> object:
    return _unpack(data)
