"""Domain types <-> protobuf: the only module of the store besides the servicer that imports *_pb2."""

from __future__ import annotations

from adapter_store.hashing import CHUNK_BYTES
from adapter_store.manifest import Manifest, State
from loraserve.v1 import adapter_store_pb2, common_pb2

_STATES = {
    State.REGISTERED: common_pb2.ADAPTER_STATE_REGISTERED,
    State.DOWNLOADING: common_pb2.ADAPTER_STATE_DOWNLOADING,
    State.READY: common_pb2.ADAPTER_STATE_READY,
    State.FAILED: common_pb2.ADAPTER_STATE_FAILED,
}
# FetchAdapterResponse.data is field 3, length-delimited: tag (3 << 3) | 2.
_DATA_TAG = b"\x1a"


def manifest(m: Manifest) -> common_pb2.AdapterManifest:
    out = common_pb2.AdapterManifest(
        ref=common_pb2.AdapterRef(name=m.name, content_hash=m.content_hash),
        source_uri=m.source_uri,
        source_version=m.source_version,
        base_model_name=m.base_model_name,
        files=[common_pb2.FileInfo(path=f.path, size=f.size, sha256=f.sha256, chunk_root=f.chunk_root,
                                   chunk_size=CHUNK_BYTES if f.chunk_root else 0) for f in m.files],
        total_size=m.total_size,
        state=_STATES[m.state],
        error=m.error,
    )
    c = m.config
    if c is not None:
        out.config.CopyFrom(common_pb2.AdapterConfigSummary(
            peft_type=c.peft_type, rank=c.rank, lora_alpha=c.lora_alpha, target_modules=list(c.target_modules),
            use_rslora=c.use_rslora, rank_pattern=c.rank_pattern, alpha_pattern=c.alpha_pattern,
            base_model_name_or_path=c.base_model_name_or_path, max_rank=c.max_rank))
    return out


def fetch_chunk(path: str, offset: int, data: bytes, sha256: str, file_size: int) -> bytes:
    """A serialized FetchAdapterResponse. The small fields go through protobuf; the data is appended as
    field 3 by hand, because building a message around 1 MiB of bytes and serializing it copies the bytes
    twice: 0.3-0.4 GB/s against 0.8 GB/s for this (2-core VM, loopback). Parsers accept fields in any order."""
    head = adapter_store_pb2.FetchAdapterResponse(path=path, offset=offset, sha256=sha256, file_size=file_size)
    if not data:
        return head.SerializeToString()
    return b"".join((head.SerializeToString(), _DATA_TAG, _varint(len(data)), data))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
