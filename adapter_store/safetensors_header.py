"""The safetensors header, read without loading a tensor: 8 bytes of little-endian header length, a JSON
object {name: {dtype, shape, data_offsets}}, then the data. Every offset is checked against the file's real
size, so a truncated or lying file is refused before anything reads a tensor from it."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from adapter_store.errors import AdapterRejectedError

# The safetensors library refuses headers over 100 MB; an adapter's header is a few KiB per layer.
MAX_HEADER_BYTES = 16 << 20
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path, what: str) -> dict[str, TensorInfo]:
    """name -> TensorInfo for every tensor of the file; AdapterRejectedError saying what is wrong otherwise.
    `what` names the file in messages ("adapter 'x': adapter_model.safetensors")."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterRejectedError(f"{what} is {size} bytes: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise AdapterRejectedError(f"{what} is not a safetensors file or is truncated: its header claims "
                                       f"{n} bytes and the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterRejectedError(f"{what}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise AdapterRejectedError(f"{what}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    spans, out = [], {}
    for name, entry in header.items():
        out[name] = _tensor(name, entry, what)
        begin, end = entry["data_offsets"]
        expected = math.prod(out[name].shape) * DTYPE_BYTES[out[name].dtype]
        if end - begin != expected:
            raise AdapterRejectedError(f"{what}: tensor {name!r} {out[name].dtype}{list(out[name].shape)} needs "
                                       f"{expected} bytes, its offsets give {end - begin}")
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise AdapterRejectedError(f"{what}: tensor {name!r} starts at byte {begin}, expected {at} "
                                       "(tensors must tile the data without gaps or overlaps)")
        at = end
    if 8 + n + at != size:
        raise AdapterRejectedError(f"{what} is {size} bytes but its header describes {8 + n + at}: "
                                   f"{'truncated' if 8 + n + at > size else 'trailing bytes'}")
    return out


def _tensor(name: str, entry, what: str) -> TensorInfo:
    ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
          and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2)
    if ok:
        ints = [*entry["shape"], *entry["data_offsets"]]
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints)
        ok = ok and entry["data_offsets"][0] <= entry["data_offsets"][1]
    if not ok:
        raise AdapterRejectedError(f"{what}: tensor {name!r} has a malformed header entry {entry!r}"[:400])
    if entry["dtype"] not in DTYPE_BYTES:
        raise AdapterRejectedError(f"{what}: tensor {name!r} has unknown dtype {entry['dtype']!r}")
    return TensorInfo(entry["dtype"], tuple(entry["shape"]))
