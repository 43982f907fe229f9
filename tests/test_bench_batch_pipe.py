"""`python -m benchmarks.batch_pipe`: the hand-over benchmark runs end to end on the CPU (stubbed engine), and every
output each design hands over reaches its reading process (the benchmark asserts it), so its figures stay real."""

from __future__ import annotations

import re

from benchmarks import batch_pipe


def test_batch_pipe_benchmark_times_every_variant_and_delivers_every_output(tmp_path, capsys):
    assert batch_pipe.main(["--batch", "6", "--steps", "12", "--block", "2", "--adapters", "2",
                            "--demo-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "stubbed engine on the CPU; batch 6, 2 adapters + base, 4 steps a variant" in out
    lines = out.splitlines()
    for name in ("dropped", "step loop writes (BatchWriter)", "sender thread"):
        [line] = [x for x in lines if x.startswith(f"  {name} ")]
        assert re.search(r"step \d+\.\d{3} ms \(x\d+\.\d{3} of dropped\), launch \d+\.\d{3} ms$", line), line
