"""`python -m benchmarks.served_host`: a worker with the engine stubbed serves streaming clients in two other
processes end to end on the CPU, with the engine on a thread and in a process of its own, and every token the streams
asked for arrives."""

from __future__ import annotations

import re

from benchmarks import served_host


def test_served_host_streams_every_token(tmp_path, capsys):
    assert served_host.main(["--batch", "6", "--tokens", "12", "--adapters", "2", "--client-procs", "2",
                             "--demo-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    for mode in ("off", "on"):  # the step loop on a thread of the server's process, then in a process of its own
        got = re.search(rf"batch 6, 2 adapters \+ base, 12 tokens a stream, engine process {mode}: the step loop "
                        r"alone .* serving ([\d.]+) ms a step .* the clients received (\d+) tokens \(\d+ tokens/s\) "
                        r"in (\d+) messages", out)
        assert got, out
        assert float(got.group(1)) > 0  # the steps' times came back, from the engine's process too
        assert int(got.group(2)) == 6 * 12  # every token, however the streams coalesced them
        assert 6 <= int(got.group(3)) <= 6 * 12
    assert out.count("kernels compiled while serving: none") == 2  # the CPU path compiles no Triton kernel
