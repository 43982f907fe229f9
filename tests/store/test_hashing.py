"""The store's content hash is the engine's, byte for byte, on every fixture adapter."""

from __future__ import annotations

import hashlib

from adapter_store.hashing import CHUNK_BYTES, content_hash, file_digests
from gpu_worker.engine.lora.peft_adapter import content_hash as engine_content_hash


def test_content_hash_agrees_with_the_engine(tiny_adapters):
    for name, path in tiny_adapters.items():
        shas = {f: file_digests(path / f)[0] for f in ("adapter_config.json", "adapter_model.safetensors")}
        assert content_hash(shas) == engine_content_hash(path), name


def test_file_digests_cover_the_file_and_each_chunk(tmp_path):
    data = bytes(range(256)) * (CHUNK_BYTES // 256 * 2 + 3)  # two full chunks and a short one
    (tmp_path / "f").write_bytes(data)
    whole, chunks = file_digests(tmp_path / "f")
    assert whole == hashlib.sha256(data).hexdigest()
    assert chunks == [hashlib.sha256(data[i:i + CHUNK_BYTES]).hexdigest() for i in range(0, len(data), CHUNK_BYTES)]
    assert len(chunks) == 3
