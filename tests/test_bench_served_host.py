"""`python -m benchmarks.served_host`: a worker with the engine stubbed serves streaming clients in another process
end to end on the CPU, and every token the streams asked for arrives."""

from __future__ import annotations

import re

from benchmarks import served_host


def test_served_host_streams_every_token(tmp_path, capsys):
    assert served_host.main(["--batch", "6", "--tokens", "12", "--adapters", "2",
                             "--demo-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    got = re.search(r"batch 6, 2 adapters \+ base, 12 tokens a stream: the step loop alone .* the clients received "
                    r"(\d+) tokens \(\d+ tokens/s\) in (\d+) messages", out)
    assert got and int(got.group(1)) == 6 * 12  # every token, however the streams coalesced them
    assert 6 <= int(got.group(2)) <= 6 * 12
