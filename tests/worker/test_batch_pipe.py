"""The engine process's Batches to the server (gpu_worker/batch_pipe.py): written by the step loop itself and never
waiting, merged while the server is far behind, a frame larger than the pipe's room finished by the
backlog's thread in order, read by the event loop without blocking, a frame split across reads, and the ends of
the pipe."""

from __future__ import annotations

import contextlib
import os
import threading

import pytest

from gpu_worker import ipc_codec
from gpu_worker.batch_pipe import HEADER, MERGE_AFTER_BYTES, BatchReader, BatchWriter, _unread
from gpu_worker.engine_core import Batch


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):  # a test closed it
            os.close(fd)


def read_all(reader: BatchReader, want: int, timeout: float = 10.0) -> list[Batch]:
    """Reads (as the event loop would, when the fd is readable) until `want` Batches came."""
    import select

    got: list[Batch] = []
    while len(got) < want:
        ready, _, _ = select.select([reader._fd], [], [], timeout)
        assert ready, f"only {len(got)} of {want} Batches came"
        got += reader.read()
    return got


def test_batches_go_at_once_while_the_server_is_a_little_behind(pipe):
    r, w = pipe
    writer, reader = BatchWriter(w), BatchReader(r)
    for i in range(5):
        writer(Batch(outputs=[f"t{i}"]))
        assert 0 < _unread(w) < MERGE_AFTER_BYTES
    assert [b.outputs for b in reader.read()] == [[f"t{i}"] for i in range(5)]
    writer(Batch(outputs=["x" * MERGE_AFTER_BYTES]))  # now it is far behind: the next ones wait, merged
    writer(Batch(outputs=["y"]))
    writer(Batch(outputs=["z"]))
    assert [b.outputs for b in read_all(reader, 1)] == [["x" * MERGE_AFTER_BYTES]]
    writer.flush(force=False)  # caught up
    assert [b.outputs for b in reader.read()] == [["y", "z"]]
    writer.join(5)


def test_batches_merge_while_the_server_has_not_read_and_go_once_it_has_or_the_loop_waits(pipe):
    r, w = pipe
    writer, reader = BatchWriter(w, merge_after=1), BatchReader(r)  # merged once a byte is unread
    writer(Batch(outputs=["a"], results=[(1, "r1", None)]))
    assert _unread(w) > 0  # written at once: the pipe was empty
    writer(Batch(load="load-2", outputs=["b"]))
    writer(Batch(outputs=["c"], failed=[("x", ValueError("v"))]))
    writer.flush(force=False)  # the server still has not read "a": b and c wait, merged
    (first,) = reader.read()
    assert first.outputs == ["a"] and first.results == [(1, "r1", None)] and first.load is None
    assert reader.read() == []
    writer.flush(force=False)  # now it has: the merged Batch goes
    (merged,) = reader.read()
    assert merged.outputs == ["b", "c"] and merged.load == "load-2" and [rid for rid, _ in merged.failed] == ["x"]
    writer(Batch(outputs=["d"]))
    writer(Batch(outputs=["e"]))
    writer.flush(force=True)  # the loop is about to wait: written although "d" is unread
    assert [b.outputs for b in reader.read()] == [["d"], ["e"]]
    writer.join(5)


def test_a_stopped_batch_is_written_at_once(pipe):
    r, w = pipe
    writer, reader = BatchWriter(w), BatchReader(r)
    writer(Batch(outputs=["a"]))
    writer(Batch(outputs=["b"], stopped=True))
    assert [(b.outputs, b.stopped) for b in reader.read()] == [(["a"], False), (["b"], True)]
    writer.join(5)


def test_a_frame_larger_than_the_pipe_never_blocks_the_writer_and_arrives_whole_and_in_order(pipe):
    r, w = pipe
    writer, reader = BatchWriter(w), BatchReader(r)
    big = [os.urandom(4096).hex() for _ in range(1024)]  # ~8 MiB encoded: past any pipe's room
    done = threading.Event()

    def write():
        writer(Batch(outputs=big))
        writer(Batch(outputs=["after"]))
        writer.flush(force=True)
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(10), "the writer blocked on a pipe nobody read"
    first, second = read_all(reader, 2)
    assert first.outputs == big and second.outputs == ["after"]
    writer.join(10)


def test_join_waits_until_the_backlog_is_written(pipe):
    r, w = pipe
    writer, reader = BatchWriter(w), BatchReader(r)
    big = [os.urandom(4096).hex() for _ in range(512)]
    writer(Batch(outputs=big, stopped=True))
    got: list[Batch] = []
    t = threading.Thread(target=lambda: got.extend(read_all(reader, 1)), daemon=True)
    t.start()
    writer.join(10)
    t.join(10)
    assert got and got[0].outputs == big and got[0].stopped


def test_a_frame_split_across_reads_waits_for_its_rest_and_eof_is_reported(pipe):
    r, w = pipe
    reader = BatchReader(r)
    data = ipc_codec.encode(Batch(outputs=["split"]))
    frame = HEADER.pack(len(data)) + data
    os.write(w, frame[:5])  # not even the whole header
    assert reader.read() == [] and not reader.eof
    os.write(w, frame[5:20])
    assert reader.read() == []
    os.write(w, frame[20:] + frame[:3])  # the rest, and the start of the next
    (batch,) = reader.read()
    assert batch.outputs == ["split"]
    os.close(w)  # the engine's end closes mid-frame
    assert reader.read() == [] and reader.eof


def test_a_frame_that_does_not_decode_breaks_the_pipe(pipe):
    """The Batches before it come; at it, BrokenPipeError and eof (ProcessLink then reports the engine gone)."""
    r, w = pipe
    reader = BatchReader(r)
    good = ipc_codec.encode(Batch(outputs=["first"]))
    os.write(w, HEADER.pack(len(good)) + good)
    assert [b.outputs for b in read_all(reader, 1)] == [["first"]]
    bad = b"\xc1 not MessagePack"
    os.write(w, HEADER.pack(len(bad)) + bad + HEADER.pack(len(good)) + good)
    with pytest.raises(BrokenPipeError, match="does not decode"):
        reader.read()
    assert reader.eof


def test_a_writer_whose_server_is_gone_drops_batches_without_raising(pipe):
    r, w = pipe
    writer = BatchWriter(w)
    os.close(r)
    writer(Batch(outputs=["lost"]))
    writer(Batch(outputs=[os.urandom(1 << 20).hex()], stopped=True))
    writer.join(5)
